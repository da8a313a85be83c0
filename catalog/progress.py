"""Progress reporting by callback: the library never prints; the CLI plugs in tqdm."""

from __future__ import annotations


class Progress:
    """Receives progress of one long operation. Methods may be called from worker threads."""

    def start(self, description: str, total: int | None, unit: str = "B") -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def done(self) -> None:
        pass


NO_PROGRESS = Progress()
