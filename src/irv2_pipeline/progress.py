"""Progress lines for long nodes that stay readable in a log file."""

from __future__ import annotations

import logging
import time


class ProgressLog:
    """Logs ``done/total``, the rate and the time left, at most every few seconds.

    Args:
        what: What is being counted, for example ``"images validated"``.
        total: How many there are in all.
        logger: Where the lines go.
        every_seconds: The least time between two lines.
    """

    def __init__(
        self, what: str, total: int, logger: logging.Logger, every_seconds: float = 10.0
    ):
        self._what = what
        self._total = total
        self._logger = logger
        self._every = every_seconds
        self._start = time.monotonic()
        self._last = self._start
        self._done = 0

    def advance(self, count: int = 1) -> None:
        """Counts ``count`` more; logs when enough time has passed or all are done."""
        self._done += count
        now = time.monotonic()
        if now - self._last >= self._every or self._done == self._total:
            self._last = now
            elapsed = max(now - self._start, 1e-9)
            rate = self._done / elapsed
            left = (self._total - self._done) / rate if rate > 0 else float("inf")
            self._logger.info(
                "%d/%d %s (%.0f/s, %s left)",
                self._done,
                self._total,
                self._what,
                rate,
                _duration(left),
            )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown time"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
