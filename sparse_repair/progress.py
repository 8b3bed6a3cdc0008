"""A dependency-free progress bar with rate and ETA, written to stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, unit: str = "it") -> None:
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw > 0.5 or self.done >= self.total):
            self._last_draw = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(20 * frac)
            # slow work (a study run takes minutes) reads better as seconds per item
            speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 or rate == 0 else \
                f"{1 / rate:.0f} s/{self.unit}"
            sys.stderr.write(f"\r{self.desc} [{bar:<20}] {self.done}/{self.total} "
                             f"{speed} elapsed {elapsed:.0f}s "
                             f"ETA {eta:.0f}s {note}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def progress(items: Iterable[T], total: int, desc: str = "", enabled: bool = True,
             unit: str = "it") -> Iterator[T]:
    bar = Progress(total, desc, enabled, unit)
    for item in items:
        yield item
        bar.update(1)
