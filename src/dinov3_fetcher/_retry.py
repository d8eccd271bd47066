"""Retry with backoff: one policy for every request a retry can fix (the bytes, and both sources' listings).

A failed try is tried again after the server's Retry-After (capped) or else after ``backoff`` seconds, doubled per
retry up to 8x; ``retries`` failed tries in a row (without progress, for the bytes) end it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from . import _env as env

__all__ = ["RetryPolicy", "Tries", "TryAgain"]


class TryAgain(Exception):
    """A try failed in a way another try may fix: why, and how long to wait first (None: the backoff)."""

    def __init__(self, why: str, wait: float | None = None) -> None:
        super().__init__(why)
        self.wait = wait


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is tried again (see the module docstring)."""

    retries: int = 5  # DINOV3_FETCHER_RETRIES: failed tries in a row before giving up
    backoff: float = 1.0  # DINOV3_FETCHER_BACKOFF: the first wait in seconds, doubled per retry, capped at 8x
    retry_after_cap: float = 120.0  # the longest Retry-After obeyed, in seconds

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy set by DINOV3_FETCHER_RETRIES and DINOV3_FETCHER_BACKOFF."""
        return cls(retries=max(0, int(env.number("DINOV3_FETCHER_RETRIES", cls.retries))),
                   backoff=max(0.0, env.number("DINOV3_FETCHER_BACKOFF", cls.backoff)))

    def retry_after(self, value: str | None) -> float | None:
        """A Retry-After header in seconds, clamped to [0, retry_after_cap]; None when absent or not a finite
        number ("nan", "inf", an HTTP date): the backoff applies then."""
        if value is None:
            return None
        try:
            seconds = float(value.strip())
        except ValueError:
            return None
        return min(max(seconds, 0.0), self.retry_after_cap) if math.isfinite(seconds) else None

    def tries(self) -> Tries:
        """A fresh count of failed tries for one request."""
        return Tries(self)


class Tries:
    """The failed tries of one request under a policy, and the wait before the next."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0  # failed tries in a row
        self._wait = policy.backoff

    def failed(self, *, wait: float | None = None, progressed: bool = False) -> bool:
        """Count a failed try (the first of a new row if it ``progressed``); False when the retries ran out, else
        sleep ``wait`` (a Retry-After) or the backoff, and True."""
        self.failures = 1 if progressed else self.failures + 1
        if self.failures > self.policy.retries:
            return False
        time.sleep(wait if wait is not None else self._wait)
        self._wait = min(self._wait * 2, self.policy.backoff * 8)
        return True
