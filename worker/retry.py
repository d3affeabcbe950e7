"""Retry with exponential backoff, honouring a server's Retry-After when it gives one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first call; delays double from ``base_delay_s``."""

    max_attempts: int = 5
    base_delay_s: float = 2.0
    max_delay_s: float = 60.0

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Delay before attempt ``attempt + 1`` (``attempt`` starts at 1)."""
        if retry_after_s is not None:
            # The server knows when its limit resets; still cap it so a bogus header cannot
            # park a GPU worker for hours.
            return min(max(retry_after_s, 0.0), self.max_delay_s)
        return min(self.base_delay_s * (2 ** (attempt - 1)), self.max_delay_s)


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_retryable: Callable[[BaseException], bool],
    retry_after_s: Callable[[BaseException], float | None] = lambda exc: None,
    what: str = "call",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, a non-retryable error occurs, or attempts run out."""
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= policy.max_attempts or not is_retryable(exc):
                raise
            delay = policy.delay_s(attempt, retry_after_s(exc))
            logger.warning(
                "%s failed (attempt %d/%d, %s); retrying in %.1fs",
                what, attempt, policy.max_attempts, type(exc).__name__, delay,
            )
            sleep(delay)
            attempt += 1
