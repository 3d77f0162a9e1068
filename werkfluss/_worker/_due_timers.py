"""A worker's timer loop: move the runs whose wake-up (or delayed start) is due from the timer set to the queue.

Every worker runs one per queue partition it serves. Each move is one script
call (atomic: a wake-up is queued once, however many workers move at the same
moment), of at most `MOVE_BATCH` runs, so a herd of wake-ups due together is
bounded work per call. On a queue with limits the loop also renews the
queue's declaration now and then, which keeps a different one out.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from .._errors import StorageError
from .._logging import log

if TYPE_CHECKING:
    from .._queues import Queue
    from .._store import QueueStore

__all__ = ["MOVE_BATCH", "move_due_timers"]

MOVE_BATCH = 100  # due timers moved per script call
DECLARE_EVERY = 20.0  # seconds between renewals of a queue's declaration


async def move_due_timers(
    store: QueueStore,
    worker: str,
    poll: float,
    stopping: anyio.Event,
    queue: str = "q",
    declared: Queue | None = None,
) -> None:
    """Move due timers of queue partition `queue` to it as they come due, until `stopping` is set.

    A nudge from the server (a hook delivered, a child ended) moves them at
    once; between nudges this sleeps in BLPOP until the next is due, at most
    `poll` seconds. Storage trouble is retried after a second. `declared`,
    the queue's declaration, is renewed every `DECLARE_EVERY` seconds.
    """
    renewed = time.monotonic()
    while not stopping.is_set():
        if declared is not None and time.monotonic() - renewed >= DECLARE_EVERY:
            renewed = time.monotonic()
            try:
                await store.ensure_queue(declared, refresh=True)  # logs a conflicting declaration itself
            except StorageError as exc:
                log.warning("worker %s: cannot renew the declaration of queue %s: %s", worker, declared.name, exc)
        try:
            moved, wait = await store.move_due(MOVE_BATCH, queue=queue)
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
            await store.wait_for_nudge(timeout, queue=queue)
        except Exception as exc:
            await _retry_later(worker, "wait for timers", exc, stopping)


async def _retry_later(worker: str, what: str, exc: Exception, stopping: anyio.Event) -> None:
    """Log that the timer loop cannot `what` yet, and give the server a second (or the stop)."""
    log.warning("worker %s: cannot %s, retrying: %s", worker, what, exc, exc_info=not isinstance(exc, StorageError))
    with anyio.move_on_after(1.0):
        await stopping.wait()
