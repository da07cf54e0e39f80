"""A small progress bar with a rate, for long ingest, synth and predict runs (stderr)."""
from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, "ingest") as bar: bar(1)`. Draws at most ~4 times a second."""

    def __init__(self, total: int, label: str, unit: str = "img", enabled: bool = True, stream=None):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > (0.25 if self._tty else 10.0) or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.label} [{bar}] {self.done}/{self.total} {rate:.1f} {self.unit}/s "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
        return False
