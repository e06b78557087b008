"""A dependency-free progress bar on stderr for long conversions.

Writers don't know about it: ``OutFile`` reports bytes to whatever bar is
active (a context variable), so every adapter gets progress for free. The bar
only draws when stderr is a terminal and the work is large.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time

from .tensor import human_bytes

MIN_BYTES = 256 << 20  # smaller jobs finish before a bar is worth drawing

_active: contextvars.ContextVar["Progress | None"] = contextvars.ContextVar("ckptconv_progress",
                                                                           default=None)


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, interval: float = 0.2):
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.done = 0
        self.interval = interval
        self._last = 0.0
        self._start = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done / max(now - self._start, 1e-6)
        self.stream.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% "
                          f"{human_bytes(self.done)}/{human_bytes(self.total)} "
                          f"{human_bytes(rate)}/s ")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


def advance(n: int) -> None:
    bar = _active.get()
    if bar is not None:
        bar.advance(n)


@contextlib.contextmanager
def progress(total: int, enabled: bool, label: str = "converting"):
    if not enabled or total < MIN_BYTES:
        yield None
        return
    bar = Progress(total, label)
    token = _active.set(bar)
    try:
        yield bar
    finally:
        _active.reset(token)
        bar.close()
