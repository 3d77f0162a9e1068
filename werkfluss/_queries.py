"""Read what runs did: `get_run`, `list_runs`, `get_events` (each sync and async),
their typed answers (`RunInfo`, `RunSummary`, `RunPage`, `Wait`, `ErrorRecord`),
and `event_dict`, the JSON form of an event.

Queries only read, and read only data: values in the log are decoded as
plain msgpack (no user types, nothing imported by name). `get_run` and
`list_runs` read state hashes and at most a few log entries, so they cost
the same for a run of ten steps and one of a hundred thousand; only
`get_events` reads a whole log. The answers are msgspec Structs, which
encode to JSON as they are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, get_args

import msgspec

from ._engine._run_deadline import is_deadline_reason
from ._errors import ConfigurationError, RunNotFoundError, StorageError
from ._events import (
    AnyEvent,
    ErrorInfo,
    RunStarted,
    RunStatus,
    StepCompleted,
    StepFailed,
    Waiting,
    decode_event,
    decode_waits,
    error_info,
)
from ._ids import check_run_id
from ._options import Settings, check_limit
from ._queue_info import waiting_on
from ._queues import DEFAULT_QUEUE, queue_of_tag
from ._store._open import open_store
from ._sync import blocking

if TYPE_CHECKING:
    from ._store import RunState, StateField

__all__ = [
    "ErrorRecord",
    "RunInfo",
    "RunPage",
    "RunSummary",
    "Wait",
    "event_dict",
    "get_events",
    "get_events_async",
    "get_run",
    "get_run_async",
    "list_runs",
    "list_runs_async",
]

STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
_SUMMARY_FIELDS: tuple[StateField, ...] = ("status", "workflow", "created", "updated", "waiting", "parent")
_BATCH = 200


class Wait(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One thing a paused run waits for, as the queries read it.

    The read form of the log's `werkfluss.events.Waiting` (what a `RunPaused`
    event records), with the due time as a UTC datetime.

    Attributes:
        kind: ``"hook"``, ``"timer"`` or ``"child"``.
        token: The hook's token (kind ``"hook"``).
        due: When the timer is due, UTC (kind ``"timer"``).
        run: The child run it waits for (kind ``"child"``).
    """

    kind: str
    token: str | None = None
    due: datetime | None = None
    run: str | None = None


class ErrorRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A run's recorded error: the exception's type name, message and traceback text.

    The read form (`RunInfo.error`) of the log's `werkfluss.events.ErrorInfo`
    (what `StepFailed`, `RunFailed` and `RunBlocked` events record).
    """

    type: str
    message: str
    traceback: str = ""


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What `list_runs` shows of a run, read from its state alone.

    Attributes:
        run_id: The run's ID.
        workflow: The workflow's ID (``module:qualname`` or its explicit name).
        status: pending, running, paused, completed, failed, blocked or cancelled.
        created: When the run was created, UTC, by the server's clock.
        updated: When its state last changed, UTC.
        waiting: What a paused run waits for (empty otherwise).
        parent: The run that started this one as a child, if one did.
    """

    run_id: str
    workflow: str
    status: RunStatus
    created: datetime
    updated: datetime
    waiting: list[Wait] = []
    parent: str | None = None


class RunInfo(RunSummary, frozen=True, kw_only=True):
    """Everything `get_run` knows of a run.

    Attributes:
        args: The workflow's positional arguments, as plain values.
        kwargs: Its keyword arguments, as plain values.
        result: What the workflow returned (status ``completed``), as a plain value.
        error: Why it failed or was blocked (status ``failed`` / ``blocked``).
        cancel_reason: The reason given to `cancel` (status ``cancelled``, or
            a cancel the run's holder has not acted on yet).
        events: How many events its log holds.
        last_step: The ID of the last step (or child workflow) the log records.
        last_seq: That step's sequence number.
        attempts: How many attempts that step has had: above 1 when it was retried.
        queue: The name of the queue the run belongs to (``"default"`` for workflows naming none).
        due: When its delayed start is due, UTC (enqueued with ``delay=`` or ``at=``), else None.
        waiting_on: Why a pending run has not started, when something on its queue holds
            it: ``"concurrency of invoices (20/20)"``, ``"concurrency of key 'acme' in
            invoices (2/2)"``, ``"rate of invoices (100/min)"``, ``"rate of key 'acme' in
            invoices (5/s)"``, ``"delayed until 2026-01-01 09:00:00 UTC"`` or ``"its turn in
            invoices (3 runs ahead)"`` (with keys, approximate: keys take turns). Read when
            asked; None when nothing holds it there (a worker has it, it runs, or it waits
            for a hook, a timer or a child).
        deadline: When its deadline passes, UTC (``@workflow(deadline=...)`` or
            ``options(deadline=...)``, counted from its creation on the timer clock),
            else None. A run cancelled for its deadline has a `cancel_reason` naming it.
        timed_out: Whether the run was cancelled because its deadline passed.
        forked_from: ``"<run>@<seq>"`` for a run started by `fork_run`: the run whose
            recorded calls before seq it replays; else None.
        forks: The runs forked from this one, oldest first.
    """

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    result: Any = None
    error: ErrorRecord | None = None
    cancel_reason: str | None = None
    events: int = 0
    last_step: str | None = None
    last_seq: int | None = None
    attempts: int = 0
    queue: str = DEFAULT_QUEUE
    due: datetime | None = None
    waiting_on: str | None = None
    deadline: datetime | None = None
    timed_out: bool = False
    forked_from: str | None = None
    forks: list[str] = []


class RunPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of `list_runs`: newest first; pass `cursor` back for the next page
    (``None`` when there is none)."""

    runs: list[RunSummary]
    cursor: str | None = None


# -- get_run ---------------------------------------------------------------------------


async def get_run_async(run_id: str, *, settings: Settings | None = None) -> RunInfo:
    """The state of run `run_id`: status, arguments, result or error, what it waits for.

    Raises:
        RunNotFoundError: there is no run `run_id`.
        StorageError: Redis/Valkey is unreachable.
    """
    check_run_id(run_id)
    store = await open_store(settings or Settings.from_env())
    state = await store.state(run_id)
    status = state.status
    if not status:
        raise RunNotFoundError(run_id)
    head, tail = await store.log_ends(run_id, 4)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    started = _event(head)
    if isinstance(started, RunStarted):
        call = _plain(started.args)
        if isinstance(call, list) and len(call) == 2 and isinstance(call[0], list) and isinstance(call[1], dict):
            args, kwargs = call
    step = _last_step([_event(body) for body in tail])
    error = error_of(error_info(state.error)) if status in ("failed", "blocked") and state.error else None
    summary = _summary(run_id, state, status)
    return RunInfo(
        **{name: getattr(summary, name) for name in summary.__struct_fields__},
        args=args,
        kwargs=kwargs,
        result=_plain(state.result) if status == "completed" and state.result is not None else None,
        error=error,
        cancel_reason=state.cancel,
        events=state.n,
        last_step=step.step if step else None,
        last_seq=step.seq if step else None,
        attempts=step.attempt if step else 0,
        queue=queue_of_tag(state.queue),
        due=_time(state.due) if state.due else None,
        waiting_on=await waiting_on(store, run_id, state),
        deadline=_time(state.deadline) if state.deadline else None,
        timed_out=status == "cancelled" and is_deadline_reason(state.cancel),
        forked_from=state.forked_from or None,
        forks=state.forks.split(),
    )


def get_run(run_id: str, *, settings: Settings | None = None) -> RunInfo:
    """Blocking twin of `get_run_async`."""
    return blocking("get_run", lambda: get_run_async(run_id, settings=settings))


def _last_step(newest_first: list[AnyEvent | None]) -> StepCompleted | StepFailed | None:
    for event in newest_first:
        if isinstance(event, (StepCompleted, StepFailed)):
            return event
    return None


# -- list_runs -------------------------------------------------------------------------


async def list_runs_async(
    *,
    workflow: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    settings: Settings | None = None,
) -> RunPage:
    """Runs, newest first, optionally only those of `workflow` or in `status`.

    Returns at most `limit` runs and a cursor for the next page. A filter
    that matches few runs may return a short (even empty) page with a
    cursor: each call looks at a bounded number of runs.

    Raises:
        ConfigurationError: `status` is not a run status, `limit` is not positive
            or `cursor` is not one `list_runs` returned.
        StorageError: Redis/Valkey is unreachable.
    """
    if status is not None and status not in STATUSES:
        raise ConfigurationError(f"unknown run status {status!r}; one of {', '.join(STATUSES)}")
    check_limit(limit)
    top, after = _parse_cursor(cursor)
    store = await open_store(settings or Settings.from_env())
    found: list[RunSummary] = []
    budget = max(limit * 20, 2000)  # runs looked at per call, so a rare filter cannot scan forever
    offset = 0
    while True:
        batch = await store.runs_by_time(top, offset, _BATCH)
        # Runs created in the same millisecond come in reverse order of their
        # IDs; at the cursor's millisecond, those not below its ID were seen.
        seen_top = top
        fresh = batch
        if after is not None:
            fresh = [(r, s) for r, s in fresh if not (s == int(seen_top) and r >= after)]
        if not fresh and len(batch) == _BATCH:
            offset += _BATCH  # a whole batch already seen in one millisecond: look further
            continue
        offset = 0
        states = await store.states([r for r, _ in fresh], _SUMMARY_FIELDS)
        for (run_id, score), state in zip(fresh, states, strict=True):
            budget -= 1
            top, after = str(score), run_id
            found_status = state.status
            if (
                found_status
                and (workflow is None or state.workflow == workflow)
                and (status is None or found_status == status)
            ):
                found.append(_summary(run_id, state, found_status))
            if len(found) == limit or budget <= 0:
                return RunPage(runs=found, cursor=f"{top}:{after}")
        if len(batch) < _BATCH:
            return RunPage(runs=found, cursor=None)


def list_runs(
    *,
    workflow: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    settings: Settings | None = None,
) -> RunPage:
    """Blocking twin of `list_runs_async`."""
    return blocking(
        "list_runs",
        lambda: list_runs_async(workflow=workflow, status=status, limit=limit, cursor=cursor, settings=settings),
    )


def _parse_cursor(cursor: str | None) -> tuple[str, str | None]:
    if cursor is None:
        return "+inf", None
    score, sep, run_id = cursor.partition(":")
    if not sep or not score.isdigit() or not run_id:
        raise ConfigurationError(f"invalid cursor {cursor!r}: pass the cursor a list_runs page returned")
    return score, run_id


# -- get_events ------------------------------------------------------------------------


async def get_events_async(run_id: str, *, settings: Settings | None = None) -> list[AnyEvent]:
    """Run `run_id`'s event log, decoded, oldest first (see `werkfluss.events`).

    Reads the whole log: its cost grows with the run's history.

    Raises:
        RunNotFoundError: there is no run `run_id`.
        StorageError: Redis/Valkey is unreachable, or an entry is malformed (named by its index).
    """
    check_run_id(run_id)
    store = await open_store(settings or Settings.from_env())
    events: list[AnyEvent] = []
    async for batch in store.read_log(run_id):
        for index, body in batch:
            event = _event(body)
            if event is None:
                raise StorageError(f"run {run_id!r}: log entry 0-{index} is malformed")
            events.append(event)
    if not events and not await store.status(run_id):
        raise RunNotFoundError(run_id)
    return events


def get_events(run_id: str, *, settings: Settings | None = None) -> list[AnyEvent]:
    """Blocking twin of `get_events_async`."""
    return blocking("get_events", lambda: get_events_async(run_id, settings=settings))


# -- the JSON form of events ----------------------------------------------------------


def event_dict(event: AnyEvent) -> dict[str, Any]:
    """An event as plain JSON-ready data: its kind, then its fields, values decoded."""
    out: dict[str, Any] = {"kind": type(event).__struct_config__.tag}
    for name in event.__struct_fields__:
        value = getattr(event, name)
        if isinstance(value, msgspec.Raw):
            value = _plain(value)
        elif isinstance(value, (ErrorInfo, Waiting)):
            value = msgspec.structs.asdict(value)
        elif isinstance(value, list):
            value = [msgspec.structs.asdict(v) if isinstance(v, Waiting) else v for v in value]
        out[name] = value
    return out


# -- decoding --------------------------------------------------------------------------


def _summary(run_id: str, state: RunState, status: RunStatus) -> RunSummary:
    return RunSummary(
        run_id=run_id,
        workflow=state.workflow,
        status=status,
        created=_time(state.created),
        updated=_time(state.updated),
        waiting=_waits(state.waiting),
        parent=state.parent or None,
    )


def _waits(raw: bytes | None) -> list[Wait]:
    if not raw:
        return []
    waits = decode_waits(raw)
    if waits is None:
        return [Wait(kind="unknown")]
    return [
        Wait(kind=w.kind, token=w.token, due=datetime.fromtimestamp(w.due, UTC) if w.due else None, run=w.run)
        for w in waits
    ]


def _event(body: bytes | None) -> AnyEvent | None:
    """An undecoded log entry's event, None when it has no body or does not decode."""
    if body is None:
        return None
    try:
        return decode_event(body)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None


def _plain(raw: bytes | msgspec.Raw) -> Any:
    """A stored user value as plain data; undecodable bytes come back as a marker string."""
    try:
        return msgspec.msgpack.decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return "<undecodable value>"


def _time(ms: int) -> datetime:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return datetime.fromtimestamp(0, UTC)


def error_of(info: ErrorInfo) -> ErrorRecord:
    """The public form of a recorded error."""
    return ErrorRecord(type=info.type, message=info.message, traceback=info.traceback)
