"""Progress bars: tqdm on stderr with count, elapsed time, ETA and rate, set up in one place.

tqdm prints ``desc: 40%|####  | 400/1000 [00:10<00:15, 40.0img/s]`` and switches to seconds
per item (``12.3s/run``) when a step takes longer than a second, which suits study runs.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class _Bar(tqdm):
    """A tqdm that closes itself (final refresh and newline) once ``total`` items are done,
    as the hand-written bar it replaces did, so that a caller need not close it before printing
    its own output; tqdm alone would close it only when the object is garbage-collected."""

    def update(self, n: float = 1) -> bool | None:
        shown = super().update(n)
        if not self.disable and self.total is not None and self.n >= self.total:
            self.close()  # close() disables the bar: later updates are no-ops
        return shown


def _options(total: int, desc: str, enabled: bool, unit: str) -> dict:
    # mininterval 0.5 s: the old bar's redraw period; stderr keeps stdout clean for --json.
    return {"total": total, "desc": desc, "unit": unit, "disable": not enabled,
            "file": sys.stderr, "mininterval": 0.5, "dynamic_ncols": True}


def progress_bar(total: int, desc: str = "", enabled: bool = True, unit: str = "it") -> tqdm:
    """A tqdm bar for ``total`` items (int) on stderr, showing rate and ETA; does nothing when
    ``enabled`` is False. Advance it with ``bar.update(n)``; it closes itself at ``total``.

    Named ``progress_bar``, not ``progress``, because the functions that draw one take a
    ``progress: bool`` argument (evaluate, train, load_split)."""
    return _Bar(**_options(total, desc, enabled, unit))


class Progress(_Bar):
    """The former hand-written bar's interface over tqdm, kept for
    ``sparse_repair/study/runner.py``: ``Progress(total, desc, enabled, unit)`` and
    ``update(n, note)``, where ``note`` is shown after the rate. New code uses ``progress_bar``."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, unit: str = "it"
                 ) -> None:
        super().__init__(**_options(total, desc, enabled, unit))

    def update(self, n: float = 1, note: str = "") -> bool | None:
        if note:
            self.set_postfix_str(note, refresh=False)  # drawn by the update below
        return super().update(n)
