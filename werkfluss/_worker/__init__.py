"""`Worker`: serve every registered workflow from its queues' Redis streams.

A worker reads "run or resume run R" messages with ``XREADGROUP`` (consumer
group ``workers``) from each queue partition it serves (on a queue with
limits, it asks the queue's admission script, `ADMIT`, for as many runs as
it has free slots, and waits on the queue's bell when none may start),
executes up to `concurrency` runs at once, and
acknowledges a message only after the progress it carried is in the log
(the run ended or paused). While it works it resets the idle time of the
messages it holds; a worker that dies stops doing so, and after the lease
another worker claims its messages with ``XAUTOCLAIM`` and resumes the runs
from their logs. A message delivered more than `max_deliveries` times goes
to the dead letters with its last error. Every worker also moves due
timers to the queue (`_due_timers`), sweeps for runs nobody would
resume (`_recovery`), and fires the ticks of the schedules it serves
(`_scheduler`). Here: its start and stop, and its message loops;
what it does with one message's run is `_take`.
"""

from __future__ import annotations

import functools
import random
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio

from .._engine._executor import fails
from .._errors import ConfigurationError, StorageError, _Suspend
from .._holder import process_holder
from .._ids import registered_workflow
from .._logging import log
from .._options import Settings
from .._queues import Queue, all_tags, declared_queues, queue_named
from .._schedules import declared_schedules
from .._store._open import open_store
from ._due_timers import move_due_timers
from ._recovery import recover_stuck_runs, sweep_after_outage
from ._scheduler import serve_schedules
from ._take import GROUP, Outcome, fail_buried, take

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence
    from types import TracebackType

    from anyio.abc import TaskGroup

    from .._engine._executor import RunExecutor
    from .._store import Store

__all__ = ["GROUP", "Worker"]


_DECLINED_FOR = 3  # leases a worker leaves a message of a workflow it does not define to the others
_IDLE_LOOK = 1.0  # seconds between looks at an idle queue (a blocking read, or a wait on its bell)

Message = tuple[str, str]
"""A message a worker holds: (its queue partition's tag, its ID in that stream)."""


class Worker:
    """Serves every workflow defined (imported) in this process from its queues.

    Use it as ``await Worker().run()``, or ``async with Worker() as worker:``
    (leaving the block stops it gracefully); ``werkfluss worker MODULE`` does the same
    from the command line. `stop()` shuts down gracefully: no new work is
    taken, runs stop at their next step boundary (a run that only waits
    pauses), and what is not done within `grace` seconds is handed back to
    the queue for another worker. ``stop(now=True)`` ends the grace at once.
    A run handed back is ``pending`` again, with no holder: it waits for a
    worker (or a `start()` of it), which resumes it from its log.

    Args:
        settings: Where the queue lives (default `Settings.from_env()`).
        concurrency: Runs executed at once (default 32).
        grace: Seconds `stop()` waits for runs to reach a step boundary.
        max_deliveries: Deliveries after which a message is dead-lettered.
        poll: Longest wait between looks at the timer set (at most 5 s, the
            socket timeout's margin); a wake-up due now reaches a worker at
            once (pushed), whatever this is.
        queues: The queues it serves (`Queue` objects or declared names);
            default: every queue declared in this process when it starts,
            the default queue included.
    """

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        concurrency: int = 32,
        grace: float = 10.0,
        max_deliveries: int = 5,
        poll: float = 4.0,
        queues: Sequence[Queue | str] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
        if max_deliveries < 1:
            raise ConfigurationError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if not (grace >= 0 and poll > 0):
            raise ConfigurationError(f"grace must be >= 0 and poll > 0, got {grace} and {poll}")
        self.settings = settings or Settings.from_env()
        # Names are resolved now, so that an unknown one fails here, naming the known ones.
        self._asked = None if queues is None else [queue_named(q) for q in queues]
        self.queues: list[Queue] = []  # what it serves, once it started
        self._tags: list[str] = []
        self._limited: set[str] = set()  # the tags of queues with limits: read through admission
        self.concurrency = concurrency
        self.grace = grace
        self.max_deliveries = max_deliveries
        self.poll = poll
        self.name = process_holder()
        self.processed = 0  # messages finished (acked, dead-lettered or handed back)
        self._store: Store | None = None
        self._tg: TaskGroup | None = None
        self._exit = AsyncExitStack()  # what leaving the worker undoes: its task group
        self._slots = anyio.Semaphore(concurrency)
        self._held: dict[Message, RunExecutor | None] = {}  # message -> the run's executor, once it runs
        self._stopping = anyio.Event()
        self._now = False  # stop(now=True): no grace
        self._grace_scope: anyio.CancelScope | None = None  # the drain's wait, while it waits
        self._empty = anyio.Event()  # set whenever the last held message is done
        self._suspect: Message | None = None  # a redelivered message on probation here (see _reclaim)
        self._trusted = anyio.Event()  # set when the probation of _suspect ends
        self._recheck: dict[str, anyio.Event] = {}  # tag -> set to make its reclaim loop look again at once
        self._outage = False  # the server did not answer: sweep for stuck runs when it does
        # Messages left for a worker that defines their workflow -> until when (monotonic) this one
        # does not claim them back, so that such a worker gets them first.
        self._declined: dict[Message, float] = {}

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called."""
        return self._stopping.is_set()

    @property
    def store(self) -> Store:
        """The connection this worker uses (after it started)."""
        if self._store is None:
            raise ConfigurationError("the worker has not started; use 'async with Worker()'")
        return self._store

    async def __aenter__(self) -> Worker:
        async with AsyncExitStack() as stack:
            self._store = await open_store(self.settings)
            self.queues = self._asked if self._asked is not None else declared_queues()
            self._tags = all_tags(self.queues)
            for queue in self.queues:
                await self._store.ensure_queue(queue)
                if queue.limited:
                    self._limited.update(queue.tags())
            for tag in self._tags:
                await self._store.ensure_group(GROUP, queue=tag)
                self._recheck[tag] = anyio.Event()
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.push_async_callback(self._shut_down)  # runs before the task group exits
            for queue in self.queues:
                for tag in queue.tags():
                    self._tg.start_soon(self._admit if tag in self._limited else self._read, tag)
                    declare = queue if queue.limited else None
                    self._tg.start_soon(move_due_timers, self.store, self.name, self.poll, self._stopping, tag, declare)
                    self._tg.start_soon(self._reclaim, tag)
            self._tg.start_soon(self._touch)
            self._tg.start_soon(recover_stuck_runs, self)  # runs nobody would ever resume
            # The schedules of the workflows it defines, on the queues it serves.
            served = {queue.name for queue in self.queues}
            schedules = [
                s
                for s in declared_schedules()
                if registered_workflow(s.workflow.id) is not None and s.workflow.queue.name in served
            ]
            if schedules:
                self._tg.start_soon(serve_schedules, self.settings, self.name, schedules, self._stopping)
            self._exit = stack.pop_all()
        names = ", ".join(q.name for q in self.queues)
        log.info("worker %s serving %d concurrent runs from queues %s", self.name, self.concurrency, names)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._exit.__aexit__(kind, exc, tb)

    async def _shut_down(self) -> None:
        """Stop, give the runs their grace, then end the loops (the task group waits for them)."""
        self.stop()
        with anyio.CancelScope(shield=True):
            await self._drain()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def run(self) -> None:
        """Serve until `stop()` is called (or the task is cancelled)."""
        async with self:
            await self.wait()

    async def wait(self) -> None:
        """Wait until `stop()` is called."""
        await self._stopping.wait()

    def stop(self, *, now: bool = False) -> None:
        """Begin a graceful shutdown (see the class docstring); safe to call twice.

        With ``now=True`` (``werkfluss worker`` on a second Ctrl-C) there is no
        grace: steps still executing are cancelled (they execute again wherever
        the run resumes) and their runs are handed back to the queue at once.
        """
        if not self._stopping.is_set():
            log.info("worker %s stopping: %d runs in progress", self.name, len(self._held))
            self._stopping.set()
            for event in self._recheck.values():
                event.set()
        if now and not self._now:
            self._now = True
            log.warning("worker %s stopping now: %d runs are handed back unfinished", self.name, len(self._held))
            if self._grace_scope is not None:
                self._grace_scope.cancel()
        for executor in self._held.values():
            if executor is not None:
                executor.stop()

    async def _drain(self) -> None:
        if self._held and not self._now:
            with anyio.move_on_after(self.grace) as self._grace_scope:
                await self._empty.wait()
            self._grace_scope = None
        if self._held and not self._now:  # after a stop "now", stop() already said they are handed back
            count = len(self._held)
            log.warning("worker %s: %d runs did not stop within %g s; handing them back", self.name, count, self.grace)

    # -- loops --------------------------------------------------------------------------

    def _share(self) -> int:
        """How many messages one reader may read now: the free slots, shared between the
        worker's queue partitions (at least one: the reader waits for its slot)."""
        return max(1, self._slots.value // len(self._tags))

    async def _read(self, tag: str) -> None:
        """Read the stream of queue partition `tag` (no limits) as slots free up."""
        while not self._stopping.is_set():
            if self._slots.value == 0:
                await anyio.sleep(0.005)
                continue
            try:
                messages = await self.store.read_queue(GROUP, self.name, self._share(), block=_IDLE_LOOK, queue=tag)
            except Exception as exc:  # a worker outlives storage trouble: it retries
                self._trouble("read the queue", exc)
                await anyio.sleep(1.0)
                continue
            await self._got(tag, messages)

    async def _admit(self, tag: str) -> None:
        """Ask queue partition `tag` (with limits) for as many runs as there are free
        slots; when none may start, wait on its bell (a run submitted, a slot freed)
        or until its rate window reopens."""
        while not self._stopping.is_set():
            if self._slots.value == 0:
                await anyio.sleep(0.005)
                continue
            try:
                messages, reopens, _ = await self.store.admit(GROUP, self.name, self._share(), queue=tag)
            except Exception as exc:
                self._trouble("take runs from the queue", exc)
                await anyio.sleep(1.0)
                continue
            await self._got(tag, messages)
            if messages or self._stopping.is_set():
                continue
            try:
                await self.store.wait_for_bell(min(_IDLE_LOOK, reopens or _IDLE_LOOK), queue=tag)
            except Exception as exc:
                self._trouble("wait for the queue", exc)
                await anyio.sleep(1.0)

    def _trouble(self, what: str, exc: Exception) -> None:
        log.warning("worker %s: cannot %s, retrying: %s", self.name, what, exc, exc_info=_bug(exc))
        self._outage = self._outage or isinstance(exc, StorageError)

    async def _got(self, tag: str, messages: list[tuple[str, dict[str, str]]]) -> None:
        self._answered()
        if self._stopping.is_set():
            # Read while stop() was called: another worker takes them at once.
            for message, fields in messages:
                await self._quietly(self._requeue((tag, message), fields))
            return
        for message, fields in messages:
            await self._spawn((tag, message), fields)

    async def _spawn(self, message: Message, fields: dict[str, str], *, slot: bool = True) -> None:
        """Handle `message` in a task of its own, in a free slot (waiting for one), or
        without one (a suspect, in the quarantine)."""
        # Held (so renewed) while it waits for a slot: a claimed message may have to.
        self._held[message] = None
        if slot:
            try:
                await self._slots.acquire()
            except BaseException:
                self._forget(message)  # stopping: it stays pending, for another worker
                raise
        assert self._tg is not None
        self._tg.start_soon(self._handle, message, fields, slot)

    def _requeue(self, message: Message, fields: dict[str, str]) -> Awaitable[None]:
        tag, ident = message
        return self.store.requeue(GROUP, ident, fields.get("r", ""), retry=fields.get("x") == "1", queue=tag)

    async def _reclaim(self, tag: str) -> None:
        """Resume the runs of workers that stopped renewing their messages (they died).

        Recovery comes before new work: a round claims into the free slots, and one
        message more when none is free, which takes the next slot that frees up
        (the reader waits behind it). A message of a worker that died with nothing
        on probation is a suspect (it may be what killed it): one at a time runs
        here on probation, in a quarantine slot beside the others, until it records
        progress. Should this worker die meanwhile, the queue blames that one alone
        (see the RECLAIM script), so only a run that kills every worker it lands on
        reaches the dead letters.
        """
        lease = self.settings.lease
        backlog = False  # the last round claimed all it could take: there may be more
        while not self._stopping.is_set():
            # Jittered, so that workers started together do not claim in lockstep; soon
            # again while a herd of abandoned runs waits (a dead worker's whole share).
            delay = 0.05 if backlog else lease / 2 * random.uniform(0.75, 1.25)
            with anyio.move_on_after(delay):
                await self._recheck[tag].wait()
            self._recheck[tag] = anyio.Event()
            if self._stopping.is_set():
                return
            count = max(self._slots.value, 1)
            quarantine = self._suspect is None
            now = time.monotonic()
            self._declined = {m: until for m, until in self._declined.items() if until > now}
            try:
                held = [ident for where, ident in [*self._held, *self._declined] if where == tag]
                claimed, buried = await self.store.reclaim(
                    GROUP, self.name, lease, count, self.max_deliveries, suspect=quarantine, held=held, queue=tag
                )
                backlog = sum(not suspect for _, _, suspect in claimed) + len(buried) >= count
                self._answered()
                for run_id, reason in buried:
                    await fail_buried(self.store, self.settings, self.name, run_id, reason)
            except Exception as exc:
                log.warning(
                    "worker %s: cannot claim abandoned messages, retrying: %s", self.name, exc, exc_info=_bug(exc)
                )
                self._outage = self._outage or isinstance(exc, StorageError)
                continue
            for ident, fields, suspect in claimed:
                message = (tag, ident)
                if message in self._held:
                    continue
                why = "left unfinished past the lease" + (" (on probation)" if suspect else "")
                log.info("worker %s claimed message %s (run %s), %s", self.name, ident, fields.get("r"), why)
                if suspect:
                    self._begin_probation(message)
                await self._spawn(message, fields, slot=not suspect)

    def _answered(self) -> None:
        """The server answers again after an outage: it may have come back from an older
        state (a restart from its append-only file, a failover), holding runs whose queue
        messages are gone. Sweep for them."""
        if self._outage:
            self._outage = False
            assert self._tg is not None
            self._tg.start_soon(sweep_after_outage, self)

    def _begin_probation(self, message: Message) -> None:
        self._suspect = message
        self._trusted = anyio.Event()
        assert self._tg is not None
        self._tg.start_soon(self._probation, message, self._trusted)

    def _end_probation(self, message: Message) -> None:
        if self._suspect == message:
            self._suspect = None
            self._trusted.set()
            for event in self._recheck.values():
                event.set()  # the quarantine is free: the next suspect may wait already

    async def _probation(self, message: Message, trusted: anyio.Event) -> None:
        """Wait for the suspect `message` to prove itself, at most a few leases (a long
        first step need not keep the worker from new work), then clear its record."""
        with anyio.move_on_after(3 * self.settings.lease):
            await trusted.wait()
        self._end_probation(message)
        with anyio.CancelScope(shield=True):
            await self._quietly(self.store.end_probation(self.name, message[1], queue=message[0]))

    async def _touch(self) -> None:
        lease = self.settings.lease
        touched = time.monotonic()  # when the last touch that got through was sent
        cut_off = False  # reported as cut off from the store, and not back since
        while True:
            await anyio.sleep(lease / 3)
            held = list(self._held)
            sent = time.monotonic()
            try:
                owned: set[Message] = set()
                for tag in self._tags:
                    mine = [ident for where, ident in held if where == tag]
                    if mine:
                        owned.update((tag, i) for i in await self.store.touch(GROUP, self.name, mine, queue=tag))
            except Exception as exc:
                log.warning("worker %s: cannot renew its messages: %s", self.name, exc, exc_info=_bug(exc))
                if not cut_off and time.monotonic() - touched >= lease:
                    cut_off = True
                    self._cut_off(time.monotonic() - touched)
                continue
            if cut_off:
                cut_off = False
                log.warning("worker %s reaches the store again after %.1f s", self.name, sent - touched)
            touched = sent
            for message in set(held) - owned:
                if message in self._held:
                    log.warning("worker %s: message %s was claimed by another worker", self.name, message)

    def _cut_off(self, seconds: float) -> None:
        """Report that the store has been out of reach for a whole lease.

        Every run this worker executes stops by itself by now (its executor could not
        renew its lease either: no new step starts, and its slot is freed); other
        workers claim the messages and resume the runs from their logs.
        """
        held, lease = len(self._held), self.settings.lease
        message = "worker %s has not reached the store for %.1f s (lease %g s): its runs stop and go to other workers"
        log.error(message + " (%d messages held)", self.name, seconds, lease, held)

    # -- one message --------------------------------------------------------------------

    async def _handle(self, message: Message, fields: dict[str, str], slot: bool = True) -> None:
        outcome: Outcome = "keep"  # leave it pending: another delivery will try again
        tag, ident = message
        try:
            started = functools.partial(self._started, message)
            outcome = await take(self.store, self.settings, self.name, message, fields, started)
            if outcome == "declined":
                # Other workers claim it once it is idle past the lease; this one waits a while longer,
                # so that one that defines the workflow gets it (each claim counts a delivery).
                self._declined[message] = time.monotonic() + _DECLINED_FOR * self.settings.lease
        except _Suspend:
            log.info("worker %s: run %s was taken over by another worker; dropping it", self.name, fields.get("r"))
        except BaseException as exc:
            if not fails(exc):
                outcome = "requeue"  # cancelled: shutting down past the grace period
                raise
            # A worker survives anything one run does (sys.exit() too); the message is
            # retried and, past max_deliveries, dead-lettered with this error.
            error = f"{type(exc).__name__}: {exc}"
            log.warning("worker %s: run %s: %s", self.name, fields.get("r"), error, exc_info=_bug(exc))
            if not isinstance(exc, StorageError):  # unreachable: the note would wait in vain, holding the slot
                await self._quietly(self.store.note_error(ident, error, queue=tag))
        finally:
            self._end_probation(message)
            with anyio.CancelScope(shield=True):
                if outcome in ("ack", "ended"):
                    run_id, ended = fields.get("r", ""), outcome == "ended"
                    await self._quietly(self.store.ack(GROUP, ident, run_id, ended=ended, queue=tag))
                elif outcome == "requeue":
                    executor = self._held.get(message)
                    if executor is not None and not executor.ended:
                        # Handed back unfinished (a stop, or cancelled past the grace): the run
                        # says it waits for a worker, not that one runs it. Before the requeue,
                        # so the worker that takes the message finds it so; fenced if one did.
                        await self._quietly(self.store.release(executor.run_id, executor.epoch, pending=True))
                    await self._quietly(self._requeue(message, fields))
                self._forget(message)
                if slot:
                    self._slots.release()
                self.processed += 1

    def _forget(self, message: Message) -> None:
        self._held.pop(message, None)
        if not self._held:
            self._empty.set()
            self._empty = anyio.Event()

    async def _quietly(self, call: Awaitable[object]) -> None:
        with anyio.move_on_after(5):
            try:
                await call
            except StorageError as exc:
                log.warning("worker %s: %s", self.name, exc)

    def _started(self, message: Message, executor: RunExecutor) -> None:
        """`message`'s run is about to execute: hold its executor (a shutdown stops it),
        and trust it again once it records progress if it is on probation."""
        self._held[message] = executor
        if self._suspect == message:
            executor.on_progress = lambda: self._end_probation(message)
        if self._stopping.is_set():
            executor.stop()


def _bug(exc: BaseException) -> bool:
    """Whether `exc` deserves a traceback in the log (storage trouble does not)."""
    return not isinstance(exc, StorageError)
