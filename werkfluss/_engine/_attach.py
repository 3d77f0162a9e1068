"""Attach to a run: acquire it, classify the store's answer, read its log, build its executor.

Every path that takes a run over comes through here, so each of those is
done one way: `drive` (the run of a `start()` call, or a child run its
parent drives) and a worker (the run a queue message names; `acquire`
alone for a run whose message went to the dead letters). What a caller
then does with each answer differs: `drive` returns a completed run's
result and raises on a conflict, a worker acknowledges or dead-letters
the message.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from logging import INFO
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import msgspec

from .._clock import WORKING
from .._errors import SerializationError
from .._events import RunResumed, RunStarted, decode_event, encode_event
from .._holder import holder_is_dead, holder_prefix
from .._logging import note
from ._cancel import cancel_run
from ._executor import RunExecutor
from ._replay import Replay
from ._run_deadline import reason as deadline_reason

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._context import WorkflowLike
    from .._holder import Holding
    from .._options import Settings
    from .._store import AcquireKind, AcquireResult, Store
    from ._call import ChildDriver, RunCall

__all__ = ["AttachKind", "Attached", "acquire", "args_digest", "attach", "read_replay", "resumed_from"]


def args_digest(canonical: bytes) -> str:
    """What a run remembers of its arguments, to refuse another call under its ID."""
    return hashlib.sha256(canonical).hexdigest()[:32]


async def acquire(
    store: Store,
    run_id: str,
    holding: Holding,
    lease: float,
    *,
    call: RunCall | None = None,
    retry: bool = True,
    take_over: str = "",
    route: str = "",
) -> AcquireResult:
    """Take run `run_id` over for `holding`.

    With a `call`, the run is created if it does not exist, and refused when
    it is another workflow's run or was started with other arguments. Without
    one (a worker, knowing only the run ID) it is taken whatever workflow it
    is a run of, never created. `retry` lets a failed or blocked run resume.

    A holder that is provably gone (a process on this host that died, or a
    caller in this one that stopped without handing the run back) is taken
    over at once, before its lease runs out: nobody else will ever release
    the run. `take_over` names one to take over from the start. A worker
    passes the queue partition its message came from (`route`): a run of
    another queue is found ``elsewhere``, not taken.

    A run past its deadline (one nobody live holds) is cancelled here, with
    its children, and found ``cancelled``: nothing of it executes again.
    """
    workflow = digest = parent = queue = ""
    started = b""
    deadline = None
    if call is not None:
        deadline = call.deadline
        # Stored as given (the body sees a dict's keys in the caller's order); compared canonically.
        args_raw, canonical = call.encoded
        workflow, parent, digest, queue = call.workflow.id, call.parent, args_digest(canonical), call.queue
        started = encode_event(RunStarted(time.time(), workflow, msgspec.Raw(args_raw), parent or None))
    while True:
        got = await store.acquire(
            run_id,
            workflow=workflow,
            holder=holding.holder,
            lease=lease,
            started=started,
            resumed=encode_event(RunResumed(time.time(), holding.holder)),
            take_over=take_over,
            args_digest=digest,
            retry=retry,
            parent=parent,
            process=holder_prefix(),
            queue=queue,
            route=route,
            deadline=deadline,
        )
        if got.kind == "expired":
            assert got.deadline is not None
            why = deadline_reason(got.allowed, got.deadline)
            if await cancel_run(store, run_id, why, gone=take_over):
                note(INFO, "run.timed_out", run_id, "run %s: %s; cancelled", run_id, why)
                return replace(got, kind="cancelled", cancel=why)
            continue  # it ended, or a live holder took it, meanwhile: look again
        if got.kind != "busy" or take_over or not holder_is_dead(got.holder):
            return got
        take_over = got.holder


AttachKind: TypeAlias = 'Literal["execute", "undefined", "unreadable"] | AcquireKind'
"""What `attach` found (see `Attached`)."""


@dataclass(slots=True)
class Attached:
    """What `attach` found, by `kind`.

    - ``"execute"``: the run is this caller's to execute: `executor`, with `args`
      and `kwargs` (a worker's are the log's);
    - ``"undefined"``: a worker took a run of a workflow this process does not
      define (`got.workflow`); it holds the run (`got.epoch`) until it releases it;
    - ``"unreadable"``: the log, or the arguments it recorded, do not decode
      (`error`); the run is held, as for undefined;
    - otherwise the store's answer (see `AcquireResult`): the run is not this
      caller's to execute (completed, cancelled, busy, ended, missing, conflict,
      other-arguments).

    `watchdog` says the run, a caller's own, was given a watchdog wake-up.
    """

    kind: AttachKind
    got: AcquireResult
    executor: RunExecutor | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    error: SerializationError | None = None
    watchdog: bool = False


async def attach(
    store: Store,
    run_id: str,
    holding: Holding,
    settings: Settings,
    drive_child: ChildDriver,
    *,
    call: RunCall | None = None,
    workflows: Callable[[str], WorkflowLike | None] | None = None,
    retry: bool = True,
    take_over: str = "",
    worker: str = "",
    route: str = "",
) -> Attached:
    """Acquire run `run_id` (see `acquire`) and, when it is this caller's to execute,
    read its log and build its executor (see `Attached`).

    A caller's own run (a `call`) executes with its own arguments. A
    worker's (`workflows` finds the workflow by its ID, `worker` names it
    in the log) executes with the arguments and the parent its log
    recorded. A `call` without a parent is given a watchdog wake-up, before
    its log is read: it has no queue message, so if this process dies the
    wake-up brings the run to a worker once the lease would have run out (a
    child needs none: whoever resumes its parent drives it again).

    Raises:
        StorageError: Redis/Valkey is unreachable.
    """
    with WORKING:  # taking a run up is work: a test clock in auto mode does not skip meanwhile
        got = await acquire(
            store, run_id, holding, settings.lease, call=call, retry=retry, take_over=take_over, route=route
        )
    if got.kind not in ("new", "resumed"):
        return Attached(got.kind, got)
    if call is not None:
        workflow: WorkflowLike | None = call.workflow
    else:
        workflow = workflows(got.workflow) if workflows is not None else None
    if workflow is None:
        return Attached("undefined", got)
    queue = got.queue or (call.queue if call is not None else "")
    watchdog = call is not None and not call.parent
    if watchdog:
        await store.wake(run_id, settings.lease, queue=queue)
    try:
        replay = Replay()
        if got.kind == "resumed":
            with WORKING:
                replay = await read_replay(store, run_id, got.retry_seq, got.retry_index)
        if call is not None:
            args, kwargs, parent = call.args, call.kwargs, call.parent
        else:
            if replay.started is None:
                raise SerializationError(f"run {run_id!r} has no run-started event")
            args, kwargs = workflow.decode_call(bytes(replay.started.args))
            parent = replay.started.parent or ""
    except SerializationError as exc:
        return Attached("unreadable", got, error=exc, watchdog=watchdog)
    if got.kind == "new":
        note(INFO, "run.started", run_id, "run %s (%s) started", run_id, workflow.id)
    else:
        how = resumed_from(got.previous) + (f" on worker {worker}" if worker else f": {replay.count} events in the log")
        note(INFO, "run.resumed", run_id, "run %s (%s) resumed %s", run_id, workflow.id, how)
    executor = RunExecutor(
        store,
        workflow,
        run_id,
        got.epoch,
        replay,
        settings,
        drive_child,
        cancel=got.cancel,
        parent=parent,
        inline=call is not None and bool(call.parent),
        holding=holding,
        queue=queue,
    )
    if got.deadline is not None:
        executor.deadline, executor.allowed = got.deadline, got.allowed
    return Attached("execute", got, executor, args, kwargs, watchdog=watchdog)


async def read_replay(store: Store, run_id: str, retry_seq: int | None, retry_index: int) -> Replay:
    """Read run `run_id`'s log in batches into a replay index.

    The final failure of `retry_seq` recorded up to `retry_index` is left
    out: that failure ended the run, and starting the run again means
    executing that step again.

    Raises:
        SerializationError: an entry does not decode (named by its index).
        StorageError: Redis/Valkey is unreachable.
    """
    replay = Replay()
    async for batch in store.read_log(run_id):
        for index, body in batch:
            try:
                if body is None:
                    raise ValueError("the entry has no event field")
                event = decode_event(body)
            except (msgspec.DecodeError, ValueError, RecursionError) as exc:
                raise SerializationError(
                    f"run {run_id!r}: log entry 0-{index} is malformed: {exc}", where=f"log entry 0-{index}"
                ) from None
            replay.add(index, event, retry_seq, retry_index)
    return replay


def resumed_from(previous: str) -> str:
    """How a resume is described in the log, by the status it resumed from."""
    return {
        "running": "after an interruption",
        "failed": "after a failure",
        "blocked": "after a code change",
        "paused": "after a pause",
        "pending": "from the queue",
    }.get(previous, f"from {previous}")
