"""`fork_run`: restart a run from a step, as a new run that replays the calls before it.

The new run's log is the original's ``RunStarted`` (same workflow, same
arguments) followed by the recorded outcomes of every call numbered below
`from_seq`: steps completed and failed, child results, timers, hook
payloads, race winners, patch markers. Nothing the original recorded from
`from_seq` on is copied, so the code deployed now replays the first calls
from the log and executes the rest. The original is left as it is.

The fork needs only the log and the workflow's ID, not its code: any process
(the CLI, say) may fork; a worker that defines the workflow executes it.
Reading the original and writing the fork are two steps, since each run's
keys live in their own slot; the fork is written in one script, and linked
back on the original in a second.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec

from ._errors import ConfigurationError, RunConflictError, RunNotFoundError, SerializationError
from ._events import (
    HookReceived,
    RaceWon,
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunResumed,
    RunStarted,
    StepCompleted,
    StepFailed,
    TimerStarted,
    decode_event,
    encode_event,
)
from ._ids import check_run_id
from ._options import Settings
from ._store._keys import DEFAULT_TAG
from ._store._open import open_store
from ._sync import blocking

if TYPE_CHECKING:
    from ._events import AnyEvent
    from ._store import RedisStore, RunState

__all__ = ["fork_run", "fork_run_async"]

# What the log says about the run as a whole rather than about one of its calls: never copied.
_RUN_EVENTS = (RunStarted, RunResumed, RunPaused, RunCompleted, RunFailed, RunBlocked, RunCancelled)


async def fork_run_async(
    run_id: str, from_seq: int, *, new_run_id: str | None = None, settings: Settings | None = None
) -> str:
    """Start a new run of run `run_id`'s workflow, with its arguments, from call `from_seq` on.

    The new run replays the original's recorded outcomes of the calls
    numbered 1 to ``from_seq - 1`` (steps are not executed again, timers and
    hooks are not waited for again) and executes call `from_seq` and what
    follows with the code the worker runs now: after fixing the bug that
    failed step N, fork from N. ``from_seq=1`` executes everything again; one
    past the last recorded call keeps every call and runs the body on from there.

    The new run goes on the original's queue, like `enqueue`: a worker that
    defines the workflow executes it (this process need not). Its state names
    the original (``forked_from`` in `get_run`: ``"<run>@<from_seq>"``) and the
    original lists it in ``forks``. The original is not changed otherwise.
    The new run gets the original's deadline allowance, counted from now.

    Args:
        run_id: The run to fork (any status; a running run's log as recorded so far).
        from_seq: The first call to execute again (a step's ``seq`` in `get_run`,
            `get_events` or ``werkfluss runs show``).
        new_run_id: The new run's ID; default ``"<run_id>~fork-<k>"``, k counting the
            original's forks from 1.
        settings: Where the runs are (default `Settings.from_env()`).

    Returns:
        The new run's ID.

    Raises:
        RunNotFoundError: there is no run `run_id`.
        ConfigurationError: `from_seq` is below 1 or past the recorded calls (the
            message says the last recorded seq), or a run ID is invalid.
        RunConflictError: a run `new_run_id` exists already (one forked from the
            same run at the same seq is finished forking instead, and returned).
        SerializationError: the original's log does not decode.
        StorageError: Redis/Valkey is unreachable.
    """
    check_run_id(run_id)
    if new_run_id is not None:
        check_run_id(new_run_id)
    if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 1:
        raise ConfigurationError(f"from_seq={from_seq!r} for run {run_id!r}: use a call's seq, 1 or more")
    store = await open_store(settings or Settings.from_env())
    state = await store.state(run_id)
    if not state.status:
        raise RunNotFoundError(run_id)
    started, events, last = await _calls_before(store, run_id, state, from_seq)
    if from_seq > last + 1:
        recorded = f"records calls up to seq {last}" if last else "records no calls yet"
        raise ConfigurationError(
            f"from_seq={from_seq} for run {run_id!r}: the run {recorded}; fork from 1 to {last + 1}"
        )
    origin = f"{run_id}@{from_seq}"
    # The fork's own RunStarted: same workflow and arguments, no parent (it is nobody's child).
    head = encode_event(RunStarted(time.time(), started.workflow, started.args))
    deadline = state.allowed / 1000 if state.allowed else None
    k = len(state.forks.split()) + 1
    while True:
        candidate = new_run_id or _derived(run_id, k)
        kind, existing = await store.create_fork(
            candidate,
            workflow=state.workflow,
            args_digest=state.args,
            started=head,
            events=_for(candidate, run_id, events),
            forked_from=origin,
            queue=state.queue,
            deadline=deadline,
        )
        # The same fork again (a retry after this call died part way): finish it.
        if kind == "new" or existing == origin:
            break
        if new_run_id is not None:
            raise RunConflictError(new_run_id, f"run {new_run_id!r} exists already: pick another new_run_id")
        k += 1
    await store.link_fork(run_id, candidate)
    if kind == "new" or await store.status(candidate) == "pending":
        await store.enqueue(candidate, queue=state.queue or DEFAULT_TAG)
    return candidate


def fork_run(run_id: str, from_seq: int, *, new_run_id: str | None = None, settings: Settings | None = None) -> str:
    """Blocking twin of `fork_run_async`: fork run `run_id` from call `from_seq`; returns the new run's ID."""
    return blocking("fork_run", lambda: fork_run_async(run_id, from_seq, new_run_id=new_run_id, settings=settings))


def _derived(run_id: str, k: int) -> str:
    """Fork number `k`'s default run ID."""
    candidate = f"{run_id}~fork-{k}"
    try:
        return check_run_id(candidate)
    except ConfigurationError:
        raise ConfigurationError(
            f"run {run_id!r}: its fork's default ID {candidate!r} is too long; pass new_run_id="
        ) from None


async def _calls_before(
    store: RedisStore, run_id: str, state: RunState, from_seq: int
) -> tuple[RunStarted, list[tuple[str, AnyEvent, bytes]], int]:
    """The original's ``RunStarted``, its recorded calls below `from_seq` as ``(dedup field,
    event, encoded event)`` in log order, and the last seq its log records (0 for none)."""
    started: RunStarted | None = None
    kept: list[tuple[str, AnyEvent, bytes]] = []
    last = 0
    async for batch in store.read_log(run_id):
        for index, body in batch:
            try:
                event: AnyEvent = decode_event(body or b"")
            except msgspec.DecodeError as exc:
                raise SerializationError(
                    f"run {run_id!r}: log entry 0-{index} is malformed: {exc}", where=f"log entry 0-{index}"
                ) from None
            if isinstance(event, RunStarted):
                started = started or event
                continue
            seq = getattr(event, "seq", None)
            if isinstance(event, _RUN_EVENTS) or not isinstance(seq, int):
                continue
            last = max(last, seq)
            if seq >= from_seq:
                continue
            # What the original's own replay leaves out (`Replay.add`): a final failure that
            # its retry executes again. The fork must not replay what the original would not.
            if isinstance(event, StepFailed) and event.final and seq == state.retry_seq and index <= state.retry_index:
                continue
            kept.append((_dedup(event, seq), event, body or b""))
    if started is None:
        raise SerializationError(f"run {run_id!r}: its log has no run-started event", where="log entry 0-1")
    return started, kept, last


def _for(fork: str, run_id: str, events: list[tuple[str, AnyEvent, bytes]]) -> list[tuple[str, bytes]]:
    """The recorded calls as fork `fork` records them: a hook's default token
    (``"<run_id>:<seq>"``) named after the fork, as its body names it on replay."""
    out = []
    for dedup, event, body in events:
        if isinstance(event, HookReceived) and event.token == f"{run_id}:{event.seq}":
            body = encode_event(msgspec.structs.replace(event, token=f"{fork}:{event.seq}"))
        out.append((dedup, body))
    return out


def _dedup(event: AnyEvent, seq: int) -> str:
    """The steps-hash field a holder records `event` under (see `_engine`'s ``record`` calls)."""
    if isinstance(event, StepCompleted):
        return f"c{seq}"
    if isinstance(event, StepFailed):
        return f"f{seq}:{event.attempt}"
    if isinstance(event, TimerStarted):
        return f"t{seq}"
    if isinstance(event, HookReceived):
        return f"h{seq}:{event.n}"
    if isinstance(event, RaceWon):
        return f"r{seq}"
    # A newer kind of call (a patch marker, say): a field of its own, which no holder rewrites.
    return f"{type(event).__name__}:{seq}"
