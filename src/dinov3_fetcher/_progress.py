"""Progress on stderr: one aggregate line over all files (bytes, rate, ETA, resumed part).

On a terminal the line redraws in place (at most 10 times a second); elsewhere there is no bar unless
``force`` asks for it. ``verbose`` adds one line per finished file. ``quiet`` prints nothing. Thread-safe.

The total is what ``expect`` was told plus every file started (the files a fetch gets before it knows the
whole plan, like config.json, count too), so the bytes shown never exceed it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO

__all__ = ["Progress", "human_bytes"]


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units (KB, MB, GB), as the messages show sizes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """The aggregate progress line of a fetch (and of verify --deep)."""
    def __init__(self, total: int = 0, *, quiet: bool = False, force: bool = False, verbose: bool = False,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.verbose = verbose
        self.bar = not quiet and (force or self.stream.isatty())
        self.total = total
        self.done = 0
        self.resumed = 0
        self.fetched = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, int, float]] = {}
        self._in_total: set[str] = set()  # files whose size ``total`` includes (see expect)

    def expect(self, sizes: Mapping[str, int]) -> None:
        """Set the total to these files plus those already started; a file started later adds its size."""
        with self._lock:
            known = {name: size for name, (size, _, _) in self._files.items()}
            known.update(sizes)
            self.total = sum(known.values())
            self._in_total = set(known)

    def message(self, text: str) -> None:
        """Print one line (clearing the bar first), unless quiet."""
        if not self.quiet:
            from ._secrets import scrub

            with self._lock:
                self._clear()
                print(scrub(text), file=self.stream, flush=True)

    def start_file(self, name: str, size: int, resumed: int) -> None:
        """A file starts, ``resumed`` of its bytes already on disk."""
        with self._lock:
            self.done += resumed
            self.resumed += resumed
            self._files[name] = (size, resumed, time.monotonic())
            if self._in_total and name not in self._in_total:
                self._in_total.add(name)
                self.total += size
        if resumed and not self.quiet:
            self.message(f"resuming {name} at {human_bytes(resumed)} of {human_bytes(size)}")

    def advance(self, n: int) -> None:
        """``n`` more bytes arrived; redraws at most 10 times a second."""
        with self._lock:
            self.done += n
            self.fetched += n
            now = time.monotonic()
            if self.bar and self.total and now - self._last >= 0.1:  # no total yet: the head start runs first
                self._last = now
                self._draw(now)

    def end_file(self, name: str) -> None:
        """A file is verified (one line with -v)."""
        size, resumed, t0 = self._files.get(name, (0, 0, time.monotonic()))
        if self.quiet or not self.verbose:
            return
        dt = max(time.monotonic() - t0, 1e-6)
        extra = f", resumed at {human_bytes(resumed)}" if resumed else ""
        self.message(f"fetched {name} ({human_bytes(size)} in {dt:.1f} s, "
                     f"{human_bytes((size - resumed) / dt)}/s{extra}, sha256 verified)")

    def close(self) -> None:
        """Draw the final state and end the line."""
        with self._lock:
            if self.bar:
                self._draw(time.monotonic())
                print(file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.bar:
            self.stream.write("\r\033[K")

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._t0, 1e-6)
        rate = self.fetched / elapsed
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        pct = min(100.0 * self.done / self.total, 100.0) if self.total else 100.0
        resumed = f" (resumed {human_bytes(self.resumed)})" if self.resumed else ""
        self.stream.write(f"\r\033[K{pct:5.1f}% {human_bytes(self.done)}/{human_bytes(self.total)} "
                          f"{human_bytes(rate)}/s ETA {eta}{resumed}")
        self.stream.flush()
