"""Progress bars: a strata.catalog Progress callback drawn with tqdm.

The library reports long operations (hashing, upload, get, verify) through `Progress`
callbacks, some of them from worker threads; one lock serialises every call on a bar.
Bars are drawn on stderr, and only when stdout is a terminal and --quiet is not given, so
piped or captured output never carries control characters.
"""

from __future__ import annotations

import sys
import threading
from typing import IO

from strata.catalog.progress import NO_PROGRESS, Progress
from tqdm import tqdm


class TqdmProgress(Progress):
    """One bar per operation; `start` after `done` draws the next operation's bar."""

    def __init__(self, file: IO[str] | None = None):
        self._file = file
        self._bar: tqdm | None = None
        self._lock = threading.Lock()

    def start(self, description: str, total: int | None, unit: str = "B") -> None:
        with self._lock:
            self._close()
            in_bytes = unit == "B"
            self._bar = tqdm(total=total, desc=description, unit=unit, unit_scale=in_bytes,
                             unit_divisor=1024 if in_bytes else 1000, leave=False,
                             dynamic_ncols=True, file=self._file or sys.stderr)

    def advance(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def done(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_progress(quiet: bool) -> Progress:
    """A bar on a terminal, nothing otherwise."""
    try:
        interactive = sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        interactive = False
    if quiet or not interactive:
        return NO_PROGRESS
    return TqdmProgress()
