"""What every entry point's config dataclass is built from (RunConfig, SelectConfig, TrainConfig):
a field that carries its default and its help text together (the CLI derives flags from them),
construction from user input that refuses unknown keys, and the device check. Imports nothing
else of the package, so a config at any layer can use it."""

from __future__ import annotations

from dataclasses import field, fields

import torch


def config_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass with a ``check()`` method (RunConfig, SelectConfig,
    TrainConfig): refuses unknown keys naming the valid ones, then runs ``check``;
    ValueError/TypeError before anything runs."""
    valid = [f.name for f in fields(cls)]
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise TypeError(f"{what} settings must be a dict {{setting: value}}, got "
                        f"{type(d).__name__}; valid settings: {', '.join(valid)}")
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
    Raises ValueError naming the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); use 'cpu' or 'cuda' "
                         f"or 'cuda:N'") from None
    if available and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use "
                         f"--device cpu")
    return dev
