"""What every entry point's config dataclass is built from (RunConfig, SelectConfig, TrainConfig):
a field that carries its default and its help text together (the CLI derives flags from them),
construction from user input that refuses unknown keys, and the device check. Imports nothing
else of the package, so a config at any layer can use it."""

from __future__ import annotations

from dataclasses import field, fields

import torch

# torch.manual_seed's range; its own error past it ("Overflow when unpacking long long") names
# no setting, so configs check seeds against it.
MAX_SEED = 2**64 - 1


def check_seed(seed: int) -> None:
    """Refuse a seed above ``MAX_SEED`` (call after the int >= 0 check). Raises ValueError."""
    if seed > MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**64 - 1] (torch's seed range), got "
                         f"{seed}")


def config_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass with a ``check()`` method (RunConfig, SelectConfig,
    TrainConfig): refuses unknown keys naming the valid ones, then runs ``check``;
    ValueError/TypeError before anything runs."""
    valid = [f.name for f in fields(cls)]
    if not isinstance(d, dict):
        raise TypeError(f"{what} settings must be a dict {{setting: value}}, got "
                        f"{type(d).__name__}; valid settings: {', '.join(valid)}")
    bad_keys = [k for k in d if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"{what} setting names must be strings, got "
                        f"{', '.join(f'{type(k).__name__} {k!r:.40}' for k in bad_keys)}; "
                        f"valid settings: {', '.join(valid)}")
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {', '.join(map(repr, unknown))}; valid "
                         f"settings: {', '.join(valid)}")
    cfg = cls(**d)
    cfg.check()
    return cfg


def _opt(default, help: str, **kw):
    """A config field (RunConfig, SelectConfig, TrainConfig): its default and its help text
    live together, once (the CLI's `--flag` help and defaults are derived from these)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def check_device(device: str, available: bool = False) -> torch.device:
    """``device`` parsed by torch; with ``available``, also refuse a CUDA device where CUDA is
    not available (checked when a run or selection starts, before any work, instead of a driver
    error mid-run; a study file naming CUDA still loads on a CPU machine for status and report).
    With ``available``, also refuse a CUDA index this machine does not have (``cuda:99``)
    and a device type that runs no model here (``meta``; ``mps`` without MPS; ``xla``...).
    A device is a string (or a torch.device): an int such as 0, which torch would read as
    ``cuda:0``, or None is refused, naming the string to write.
    Raises ValueError naming the fix."""
    if isinstance(device, bool) or not isinstance(device, str | torch.device):
        hint = f"'cuda:{device}'" if isinstance(device, int) and not isinstance(device, bool) \
            else "'cpu' or 'cuda' or 'cuda:N'"
        raise ValueError(f"device must be a device name (a string), got "
                         f"{type(device).__name__} {device!r:.60}; use {hint}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); use 'cpu' or 'cuda' "
                         f"or 'cuda:N'") from None
    if not available:
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; "
                             f"use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA "
                             f"device(s), cuda:0 to cuda:{count - 1}; use one of those")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; "
                             f"use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(device)!r}: only cpu, cuda and mps devices run models "
                         f"here; use --device cpu or --device cuda")
    return dev
