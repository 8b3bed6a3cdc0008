"""Process-level CPU settings for our entry points (CLI, benchmark and test sessions, study
workers), and where the package's warnings point (``user_stacklevel``). Library imports never
call ``tune_allocator``: it changes the whole process's allocator.

Why: at 64 px a ResNet-20 activation chunk is tens of MB, above glibc's mmap threshold, so every
freed activation goes back to the kernel and the next one is page-faulted in again. Measured on
this project's 2-core machine with `python scripts/bench_allocator.py` (resnet20, four eval
forwards of 128 images at 64 px, fresh process each, two interleaved repeats, a CI run sharing
the cores): default thresholds 12.7-15.3 s wall, 4.6-5.4 s system time, 1.2-1.5 M minor page
faults; with the thresholds below 3.0-6.7 s wall, 0.2 s system time, 62 k faults.
Peak memory is unchanged; freed memory is kept for reuse
instead of being returned, so the resident size stays at the peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 30   # allocations below 1 GiB come from the heap and stay there
_DONE = False


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds so large tensors are reused, not page-faulted in
    anew. Returns True when applied; False on non-glibc platforms or when the environment sets
    SPARSE_REPAIR_MALLOC=default (opt out). Idempotent."""
    global _DONE
    if _DONE:
        return True
    if os.environ.get("SPARSE_REPAIR_MALLOC", "").lower() == "default":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES) == 1 and \
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES) == 1
    _DONE = ok
    return ok


_PACKAGE = Path(__file__).resolve().parent  # sparse_repair/


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that attributes the warning to the first frame
    outside this package (the user's script, notebook cell or test), whatever the call depth
    inside it: a fixed number pointed at our own code whenever a new caller (the memo,
    ``calibration_set``, ``repair``'s dispatch) sat in between. Call it as the argument of
    ``warnings.warn`` in the function that warns. Returns an int >= 1."""
    frame, level = sys._getframe(1), 1  # the function calling warnings.warn: level 1
    while _in_package(frame.f_code.co_filename):
        if frame.f_back is None:  # only our frames (a thread's target): the outermost
            break
        frame, level = frame.f_back, level + 1
    return level


def _in_package(filename: str) -> bool:
    # "<stdin>", "<string>": code typed by the user, never ours (resolving them against the
    # working directory would count them as ours when it lies inside the package)
    return not filename.startswith("<") and Path(filename).resolve().is_relative_to(_PACKAGE)
