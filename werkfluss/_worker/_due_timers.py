"""A worker's timer loop: move the runs whose wake-up is due from the timer set to the queue.

Every worker runs it. Each move is one script call (atomic: a wake-up is
queued once, however many workers move at the same moment), of at most
`MOVE_BATCH` runs, so a herd of wake-ups due together is bounded work per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from .._errors import StorageError
from .._logging import log

if TYPE_CHECKING:
    from .._store import QueueStore

__all__ = ["MOVE_BATCH", "move_due_timers"]

MOVE_BATCH = 100  # due timers moved per script call


async def move_due_timers(store: QueueStore, worker: str, poll: float, stopping: anyio.Event) -> None:
    """Move due timers to the queue as they come due, until `stopping` is set.

    A nudge from the server (a hook delivered, a child ended) moves them at
    once; between nudges this sleeps in BLPOP until the next is due, at most
    `poll` seconds. Storage trouble is retried after a second.
    """
    while not stopping.is_set():
        try:
            moved, wait = await store.move_due(MOVE_BATCH)
        except Exception as exc:
            await _retry_later(worker, "move due timers", exc, stopping)
            continue
        if moved:
            log.debug("worker %s moved %d due timers to the queue", worker, moved)
            if moved >= MOVE_BATCH:
                continue  # a herd: the next batch at once
        timeout = poll if wait is None else min(poll, wait)
        if timeout <= 0:
            continue
        try:
            await store.wait_for_nudge(timeout)
        except Exception as exc:
            await _retry_later(worker, "wait for timers", exc, stopping)


async def _retry_later(worker: str, what: str, exc: Exception, stopping: anyio.Event) -> None:
    """Log that the timer loop cannot `what` yet, and give the server a second (or the stop)."""
    log.warning("worker %s: cannot %s, retrying: %s", worker, what, exc, exc_info=not isinstance(exc, StorageError))
    with anyio.move_on_after(1.0):
        await stopping.wait()
