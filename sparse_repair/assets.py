"""The one rule that finds data and weights: --assets DIR, else $SPARSE_REPAIR_ASSETS, else
~/.cache/sparse_repair. Nothing in the project hard-codes a path."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ENV_VAR = "SPARSE_REPAIR_ASSETS"
UNPACK_HINT = ("on this project's machines run `../shared/assets/unpack.sh .assets` and "
               f"`export {ENV_VAR}=$PWD/.assets`; on a machine with internet pass --download")


class AssetMissingError(FileNotFoundError):
    """A data set or weight file is not under the asset root. The message says how to get it."""


def asset_root(override: str | os.PathLike | None = None) -> Path:
    """``override`` when given, else ``$SPARSE_REPAIR_ASSETS``, else ~/.cache/sparse_repair.
    ValueError for an empty ``override`` (it used to fall through to the others)."""
    if override is not None:
        if not str(override).strip():
            raise ValueError("empty asset root: pass a directory path (or None for "
                             "$SPARSE_REPAIR_ASSETS, else ~/.cache/sparse_repair)")
        return Path(override).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "sparse_repair"


def set_asset_root(path: str | os.PathLike) -> Path:
    """Make ``path`` the asset root of this process and of every process it starts, and return
    it as an absolute path (``~`` expanded, symlinks kept).

    The one writer of ``$SPARSE_REPAIR_ASSETS``: the variable, not an argument threaded through
    every loader, is how the root reaches data and weight loaders, subprocesses, and study
    workers on Ray or Slurm (which get the driver's root as a task argument and set it here).
    The path is made absolute because a worker or subprocess may run in another directory.
    Raises ValueError for an empty path; the directory need not exist yet (a download creates
    it), and a missing asset is reported by ``require`` when it is looked up."""
    if not str(path).strip():
        raise ValueError("empty asset root: pass a directory path")
    root = Path(path).expanduser().absolute()
    os.environ[ENV_VAR] = str(root)
    return root


def cache_dir(root: Path | None = None) -> Path:
    """Decoded-image caches live next to the data they came from."""
    path = (root or asset_root()) / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise AssetMissingError(f"{what} not found: looked for {path} (asset root "
                                f"{asset_root()}); {UNPACK_HINT}")
    return path


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """Fetch ``url`` to ``dest`` with ``torch.hub.download_url_to_file`` and return ``dest``.

    ``sha256`` (hex, a prefix such as torch.hub's 8-hex file-name convention, or the full
    digest; None skips the check) is passed as ``hash_prefix``: torch.hub hashes while it
    downloads into a temporary file next to ``dest`` and moves it into place only on a match,
    so a broken or wrong download never lands at ``dest``. Raises ValueError (the same text as
    ``verify_sha256``) on a mismatch; network errors propagate as torch.hub raises them."""
    # Imported here so that importing assets stays torch-free; the attribute is looked up on
    # each call, which lets tests monkeypatch torch.hub.download_url_to_file.
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256)
    except RuntimeError as e:
        # torch.hub's only signal for a bad hash: 'invalid hash value (expected "..", got "..")'
        if "invalid hash value" not in str(e):
            raise
        got = re.search(r'got "([0-9a-f]+)"', str(e))
        raise ValueError(f"checksum mismatch for {dest}: expected sha256 {sha256}..., got "
                         f"{got.group(1) if got else str(e)}; delete the file and fetch it "
                         "again") from e
    return dest


def verify_sha256(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    digest = sha256_of(path)
    if not digest.startswith(sha256):
        raise ValueError(f"checksum mismatch for {path}: expected sha256 {sha256}..., got "
                         f"{digest}; delete the file and fetch it again")
