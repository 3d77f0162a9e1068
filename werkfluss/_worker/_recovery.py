"""Find the runs nobody will ever resume, and hand them to the workers.

A run executed by a worker has a queue message until its progress is in
the log; a paused run has a timer entry or waits for a hook; a run that
`start()` executes has a watchdog wake-up on the timer set (see
`_engine._drive.drive`). A run that has none of these and no live holder is
stuck: a `start()` script of an older version that died, or a process that
died in the one round trip between taking a run and arming its watchdog,
or an `enqueue` that died between creating its run and queueing it.

When a worker starts, and every `SWEEP_EVERY` seconds while it serves,
`recover_stuck_runs` sweeps the run index in batches and wakes each such
run, so that a worker resumes it from its log. One worker of a prefix
sweeps per `SWEEP_EVERY` seconds (a key on the queue's slot says who did):
a fleet restarting together reads the index once.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio

from .._errors import ConfigurationError, StorageError
from .._holder import holder_is_dead
from .._ids import check_run_id
from .._logging import log
from .._queues import tags_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._options import Settings
    from .._store import RunState, StateField, Store

__all__ = [
    "BATCH",
    "QUEUE_LIMIT",
    "SWEEP_EVERY",
    "Serving",
    "Sweep",
    "recover_stuck_runs",
    "sweep",
    "sweep_after_outage",
]

BATCH = 200  # runs read per round trip of the sweep
QUEUE_LIMIT = 10_000  # a longer queue is a backlog: the sweep waits for a round with less
SWEEP_EVERY = 600.0  # seconds: at most one sweep per prefix this often, by whichever worker
_PAUSE = 0.005  # seconds between batches: a sweep of a large index never crowds out real work
_FIELDS: tuple[StateField, ...] = ("status", "holder", "lease", "updated", "queue")


class Serving(Protocol):
    """What a sweep asks of the worker it runs in (`Worker`): its name, store and
    lease, and whether (and when) it stops."""

    @property
    def name(self) -> str:
        """The worker's name, for the log and the sweep's claim."""

    @property
    def settings(self) -> Settings:
        """Its settings: the lease."""

    @property
    def store(self) -> Store:
        """Its connection."""

    @property
    def stopping(self) -> bool:
        """Whether it is stopping."""

    async def wait(self) -> None:
        """Wait until it stops."""


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did: runs read from the index, runs woken, seconds taken."""

    scanned: int
    woken: int
    seconds: float


async def recover_stuck_runs(worker: Serving) -> None:
    """Sweep for stuck runs as `worker` starts serving, and again every `SWEEP_EVERY`
    seconds or so while it serves (a task of the worker): a run can also get stuck
    later, when a server rolled back by a failover keeps a run the queue has
    forgotten. Among the workers of a prefix, one sweeps per `SWEEP_EVERY`.

    Never raises: a worker serves its queue whatever the sweep runs into.
    """
    while not worker.stopping:
        await _sweep_once(worker)
        with anyio.move_on_after(SWEEP_EVERY * random.uniform(1.0, 1.25)):
            await worker.wait()


async def sweep_after_outage(worker: Serving) -> None:
    """Sweep once the server answers again after an outage (a task of `worker`).

    A server that restarted from an older append-only file, or a replica
    promoted by a failover, may hold a run as unfinished whose queue message
    is gone (acknowledged just before): nobody would resume it. One worker of
    the prefix sweeps per lease, waking every run with no message and no timer.
    """
    await _sweep_once(worker, "sweep:outage", worker.settings.lease, margin=-math.inf)


async def _sweep_once(worker: Serving, key: str = "sweep", every: float = SWEEP_EVERY, **options: float) -> None:
    store = worker.store
    try:
        if not await store.claim_sweep(worker.name, every, key=key):
            return  # another worker swept within `every`
        queued = await _queued(store, lambda: worker.stopping)
        if queued is None:
            backlog = f"the queue holds more than {QUEUE_LIMIT} messages"
            log.info("worker %s: %s; no sweep for stuck runs this time", worker.name, backlog)
            return
        done = await sweep(store, worker.settings.lease, queued, stopping=lambda: worker.stopping, **options)
    except Exception as exc:
        trace = not isinstance(exc, StorageError)
        log.warning("worker %s: the sweep for stuck runs stopped: %s", worker.name, exc, exc_info=trace)
        return
    name, scanned, seconds, woken = worker.name, done.scanned, done.seconds, done.woken
    log.info("worker %s: swept %d runs in %.2f s; woke %d that nobody was executing", name, scanned, seconds, woken)


async def _queued(store: Store, stopping: Callable[[], bool]) -> set[str] | None:
    """The runs with a message in any queue this server knows (or waiting for admission
    or a delayed start), or None when one queue holds a backlog."""
    while True:
        try:
            tags = ["q"]
            for name, partitions in (await store.known_queues()).items():
                tags.extend(tags_of(name, partitions))
            runs: set[str] = set()
            for tag in tags:
                found = await store.queued_runs(QUEUE_LIMIT, queue=tag)
                if found is None:
                    return None
                runs |= found
            return runs
        except StorageError as exc:
            if stopping():
                raise
            log.warning("cannot read the queue for the sweep for stuck runs, retrying: %s", exc)
            await anyio.sleep(1.0)


async def sweep(
    store: Store, lease: float, queued: set[str], *, stopping: Callable[[], bool], margin: float | None = None
) -> Sweep:
    """Wake every run of the index that is stuck; returns the figures.

    Stuck: no message in `queued` (the runs with a queue message), no timer
    entry, and either ``running`` with a holder that is provably gone or
    whose lease ran out more than a `lease` ago, or ``pending`` unchanged for
    a `lease`. The margin leaves a dead worker's runs to the claim of its
    messages, and a fresh pending run to the message its `enqueue` is
    writing. A run judged stuck wrongly is harmless: the worker that takes
    the wake-up finds it busy (and re-arms it for when the lease would run
    out) or ended, and acknowledges it.

    `margin` (default: `lease`) replaces that margin: after the server came
    back from an outage, a run may look held by a lease the server rolled
    back, so every run with no message and no timer is woken then.

    Storage errors are retried (the batch again, after a second) until
    `stopping()`.
    """
    margin = lease if margin is None else margin
    began = time.monotonic()
    scanned = woken = 0
    top, offset = "+inf", 0
    while not stopping():
        try:
            batch = await store.runs_by_time(top, offset, BATCH)
            if not batch:
                break
            ids = [run for run, _ in batch]
            states = await store.states(ids, _FIELDS)
            now = store.server_now()  # leases are the server's times
            candidates = [
                run
                for run, state in zip(ids, states, strict=True)
                if run not in queued and _stuck(state, margin, now) and _valid(run)
            ]
            queues = {run: state.queue for run, state in zip(ids, states, strict=True)}
            for run in candidates:
                queue = queues[run]
                if (await store.due([run], queue=queue))[0] is None:
                    log.debug("run %s: nobody executes it and nothing will wake it; waking it", run)
                    await store.wake(run, queue=queue)
                    woken += 1
        except StorageError as exc:
            log.warning("the sweep for stuck runs cannot reach the server, retrying: %s", exc)
            await anyio.sleep(1.0)
            continue
        scanned += len(batch)
        # Runs created in the same millisecond share a score: page on (score, offset).
        last = batch[-1][1]
        same = sum(1 for _, score in batch if score == last)
        offset = offset + same if top == str(last) else same
        top = str(last)
        await anyio.sleep(_PAUSE)
    return Sweep(scanned, woken, time.monotonic() - began)


def _stuck(state: RunState, margin: float, now: float) -> bool:
    """Whether a run's state says nobody executes it (see `sweep`)."""
    if state.status == "running":
        holder = state.holder
        return state.lease / 1000 + margin <= now or (bool(holder) and holder_is_dead(holder))
    if state.status == "pending":
        return state.updated / 1000 + margin <= now
    return False


def _valid(run_id: str) -> bool:
    """Whether `run_id` is one a worker would take (the index may hold anything)."""
    try:
        check_run_id(run_id)
    except ConfigurationError:
        return False
    return True
