"""A periodic progress line with rates (and an ETA when the total is known)."""

import sys
import time


def format_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class Progress:
    def __init__(self, label: str, every_s: float = 5.0, stream=None):  # None: sys.stdout when printing
        self.label, self.every_s, self.stream = label, every_s, stream
        self.start = self._last = time.monotonic()
        self._printed: dict | None = None  # the counts of the last line printed

    def update(self, counts: dict[str, float], done_fraction: float | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        if force and counts == self._printed:  # the final line would repeat the last one
            return
        self._last, self._printed = now, dict(counts)
        elapsed = max(now - self.start, 1e-9)
        parts = [f"{format_count(v)} {k} ({format_count(v / elapsed)}/s)" for k, v in counts.items()]
        if done_fraction:
            parts.append(f"ETA {elapsed * max(0.0, 1 - done_fraction) / done_fraction:.0f}s")  # a source may pass its share
        print(f"[{self.label}] " + ", ".join(parts), file=self.stream or sys.stdout, flush=True)
