"""Retry with exponential backoff (tenacity), honouring a server's Retry-After when it gives one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

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
    """Call ``fn`` until it succeeds, a non-retryable error occurs, or attempts run out (then
    the last error is raised as it was)."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return policy.delay_s(state.attempt_number,
                              retry_after_s(exc) if exc is not None else None)

    def log(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        logger.warning("%s failed (attempt %d/%d, %s); retrying in %.1fs", what,
                       state.attempt_number, policy.max_attempts, type(exc).__name__,
                       state.upcoming_sleep)

    retrying = Retrying(stop=stop_after_attempt(policy.max_attempts), wait=wait,
                        retry=retry_if_exception(is_retryable), before_sleep=log, sleep=sleep,
                        reraise=True)
    return retrying(fn)


def retry_while(fn: Callable[[], T], *, retryable: type[BaseException] | tuple[type[BaseException], ...],
                budget_s: float, what: str, first_delay_s: float = 0.2, max_delay_s: float = 5.0,
                sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on ``retryable`` errors with doubling delays until ``budget_s`` would be
    exceeded (then the last error is raised)."""
    from tenacity import retry_if_exception_type, stop_before_delay, wait_exponential

    def log(state: RetryCallState) -> None:
        logger.warning("%s failed (%s); retrying in %.1f s", what,
                       type(state.outcome.exception()).__name__ if state.outcome else "?",
                       state.upcoming_sleep)

    retrying = Retrying(stop=stop_before_delay(budget_s),
                        wait=wait_exponential(multiplier=first_delay_s, min=first_delay_s,
                                              max=max_delay_s, exp_base=2),
                        retry=retry_if_exception_type(retryable), before_sleep=log,
                        sleep=sleep, reraise=True)
    return retrying(fn)
