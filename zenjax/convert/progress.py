"""A tiny progress bar on stderr (tqdm is not a dependency), drawn only on a terminal.

    converting [##########..........]  50%  7.6/15.2 GB  layers/13  41 s
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, *, enabled: bool | None = None, label: str = "", width: int = 30,
                 stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.width = max(total, 1), label, width
        self.done, self.t0, self._last = 0, time.monotonic(), 0.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *_):
        if self.enabled:
            if exc_type is None:
                self._draw("done", force=True)
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int, what: str = "") -> None:
        self.done += n
        if self.enabled:
            self._draw(what)

    def _draw(self, what: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1 and self.done < self.total:
            return   # redrawing more than 10x a second only costs time
        self._last = now
        frac = min(self.done / self.total, 1.0)
        fill = int(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        unit, div = ("GB", 1e9) if self.total >= 1e9 else ("MB", 1e6)
        self.stream.write(f"\r{self.label} [{bar}] {frac:4.0%}  {self.done / div:.1f}/{self.total / div:.1f} {unit}"
                          f"  {what:<12} {now - self.t0:4.0f} s")
        self.stream.flush()
