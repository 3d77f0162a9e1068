"""How long the store waits for the server: the timeouts, and one deadline per call across its retries.

A call tried first on the fast lane and then through redis-py (see `_lane`)
has one deadline for both: the lane hands what is left of it over in a context
variable (`carry`), and `DeadlineRetry`, redis-py's retry policy here, ends the
call's attempts there.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING, Any

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

# How long werkfluss waits for the server. One attempt waits SOCKET_TIMEOUT for a reply: above the
# longest blocking read werkfluss issues (the worker's BLPOP for timer nudges, up to its `poll`,
# 4 s; XREADGROUP BLOCK 1 s) plus a healthy server's stall (an fsync, a fork for a rewrite: a
# second or two). One call, retries included, waits CALL_DEADLINE at most, from its first attempt
# on the fast lane to its last through redis-py: long enough to ride out a restart (connections
# refused, then LOADING), short enough that a worker cut off by a partition (no RST, nothing
# answers) learns it within seconds, not minutes.
SOCKET_TIMEOUT = 7.0
CALL_DEADLINE = 10.0
# The first call of a connection (is the server there at all?) gives up sooner: a wrong URL or
# a server that is down is reported in seconds, as it was before the deadline (6 retries).
FIRST_CALL_DEADLINE = 5.0
# Seconds after a fast-lane miss during which redis-py's calls in that task keep the lane's deadline:
# the call goes on through redis-py at once (a pool's connect, then the command, each a retry loop of
# its own). The task's next lane call drops it; so does this window, for a call that was abandoned.
_CARRY_FRESH = 1.0


# The deadline of the call this task is making through redis-py (loop time), while it makes it.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("werkfluss_deadline", default=None)

# ``(deadline, loop time of the miss)`` a fast-lane call hands to redis-py's path when it misses.
carried: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "werkfluss_carried_deadline", default=None
)


def carry(started: float, budget: float | None) -> None:
    """End the deadline of this task's next redis-py calls at `started` + `budget` (loop time):
    what is left of a fast-lane call's deadline, or a shorter one for a first call."""
    if budget is not None:
        carried.set((started + budget, asyncio.get_running_loop().time()))


class DeadlineRetry(Retry):
    """redis-py's `Retry`, bounded by a total deadline per call (`budget` seconds) instead of a count.

    redis-py nests its retries: a command's attempt reconnects, and the reconnect's handshake
    and the health check's PING retry on their own, each with the same count, so the waits
    multiply (6 retries took 24 s against a server refusing connections, and a blackholed
    command 7 times socket_timeout and more). Here the outermost retry loop sets a deadline
    that nested ones share, and cuts the attempt in flight when it passes: the call raises
    redis-py's `TimeoutError` (``StorageError`` for werkfluss's callers). Until then failures
    are retried with backoff, however many, so a restart of a few seconds is ridden out.
    A call the fast lane tried first gets only what is left of the same deadline.

    `retries` stays a count for what reads it as one: redis-py's failure handlers (they
    only record metrics past it) and a cluster client, which gets a plain `Retry` anyway.
    """

    def __init__(self, budget: float, *, retries: int = 1000) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.05), retries)
        self.budget = budget

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeadlineRetry) and self.budget == other.budget and super().__eq__(other)

    __hash__ = Retry.__hash__

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[Any]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        """Call `do` until it succeeds, retrying supported errors with backoff, within the deadline."""
        deadline = _deadline.get()
        if deadline is not None:  # inside an attempt of an outer call: its deadline is ours
            return await self._attempts(do, fail, is_retryable, with_failure_count, deadline)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self.budget
        handed = carried.get()
        if handed is not None and now - handed[1] <= _CARRY_FRESH:
            deadline = min(deadline, handed[0])
        token = _deadline.set(deadline)
        try:
            async with asyncio.timeout_at(deadline):
                return await self._attempts(do, fail, is_retryable, with_failure_count, deadline)
        except TimeoutError:
            # asyncio's, from the deadline (redis-py's own timeouts are its TimeoutError, no builtin one).
            raise RedisTimeoutError(f"no reply within {self.budget:g} s, retries included") from None
        finally:
            _deadline.reset(token)

    async def _attempts(
        self,
        do: Callable[[], Awaitable[Any]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None,
        with_failure_count: bool,
        deadline: float,
    ) -> Any:
        loop = asyncio.get_running_loop()
        self._backoff.reset()  # type: ignore[no-untyped-call]
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                await (fail(error, failures) if with_failure_count else fail(error))
                backoff = self._backoff.compute(failures)
                if loop.time() + backoff >= deadline:
                    raise error
                if backoff > 0:
                    await asyncio.sleep(backoff)
