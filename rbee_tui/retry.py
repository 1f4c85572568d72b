"""The one retry policy of the operator side: a typed schedule of attempts and waits.

SSH connections (B01), the agent HTTP client (B12) and the inference flow's wait for a full
queue (B44) all retry by a `RetryPolicy` and report each failed try the same way, as an
`Attempt` event ("attempt 1/3: …; retrying in 0.2 s"). A schedule is data, not a loop: the
caller owns the loop and asks the policy how long to wait after try `n`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RetryPolicy(BaseModel):
    """`attempts` tries in all; after failed try n (1-based) wait `backoff_s[n - 1]` seconds
    (the last entry repeats; an empty list means no wait) before try n + 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(ge=1)
    backoff_s: tuple[float, ...] = ()

    def wait_after(self, number: int) -> float | None:
        """Seconds to wait after failed try `number` before the next; None when it was the
        last try."""
        if number >= self.attempts:
            return None
        if not self.backoff_s:
            return 0.0
        return max(0.0, self.backoff_s[min(number - 1, len(self.backoff_s) - 1)])


def policy(attempts: int, *backoff_s: float) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, backoff_s=backoff_s)
