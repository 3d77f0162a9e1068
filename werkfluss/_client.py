"""What a script calls to steer runs: start, enqueue, invoke_hook, cancel,
resume, and the hooks' mailboxes (each sync and async).

Each gets its store from `_store._open` (one per event loop and settings, so
repeated `start_async` calls reuse their connections); each blocking twin runs
its own event loop through `_sync.blocking`, which closes what it opened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._engine._call import RunCall
from ._engine._cancel import cancel_run
from ._engine._drive import drive
from ._engine._submit import submit_run
from ._errors import ConfigurationError, HookClosedError, RunConflictError, RunNotFoundError
from ._ids import check_run_id, check_token, derive_run_id
from ._options import Settings, check_limit, parse_duration
from ._queues import DEFAULT_PRIORITY
from ._store._open import open_store
from ._sync import blocking
from ._values import encode_checked, encode_run_call
from ._wrappers import Step, Workflow

if TYPE_CHECKING:
    from datetime import timedelta

    from ._store import Store


__all__ = [
    "PendingHook",
    "cancel",
    "cancel_async",
    "enqueue",
    "enqueue_async",
    "expire_hooks",
    "expire_hooks_async",
    "invoke_hook",
    "invoke_hook_async",
    "pending_hooks",
    "pending_hooks_async",
    "resume",
    "resume_async",
    "start",
    "start_async",
]

P = ParamSpec("P")
R = TypeVar("R")


def _check_workflow(workflow: object, called: str) -> None:
    """Refuse anything but a `Workflow` at the entry of `called`, saying what to do instead.

    A step is not run as an implicit one-step workflow: that workflow would be
    defined only in the calling process (a worker could not serve an enqueued
    run of it), and its ID would collide with the step's own.
    """
    if isinstance(workflow, Workflow):
        return
    if isinstance(workflow, Step):
        name = getattr(workflow.fn, "__name__", "the_step")
        raise ConfigurationError(
            f"{called}() takes a workflow, but {workflow.id!r} is a step: steps run inside a workflow run. "
            f"Define a @workflow that awaits it ('@workflow async def {name}_flow(...): return await {name}(...)') "
            f"and {called}() that; or await {name}(...) outside any run to execute it once, recording nothing"
        )
    what = getattr(workflow, "__qualname__", None) or repr(workflow)
    raise ConfigurationError(
        f"{called}() takes a workflow, but got {what} ({type(workflow).__name__}): "
        f"decorate the async function with @workflow and pass that"
    )


async def start_async(workflow: Workflow[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Start or attach to a run of `workflow` and return its result.

    The run ID is ``workflow.options(run_id=...)``'s, or derived from the
    workflow ID and the arguments, so the same call reaches the same run:
    a completed run returns its recorded result without executing
    anything; an interrupted, paused or failed one resumes, executing only
    the steps that did not complete. While the run is paused (a hook, a
    sleep), this waits for it; the pause is durable, so if this process
    stops, any later `start` or a worker resumes the run.

    Raises:
        StepFailedError: a step exhausted its retries and the workflow did not catch it.
        NonDeterminismError: the code no longer matches the run's log; the run is blocked.
        RunFailedError: the run failed in another process while this one waited for it.
        RunCancelledError: the run was cancelled.
        RunConflictError: the run ID belongs to another workflow or other arguments.
        SerializationError: an argument or result cannot be stored.
        StorageError: Redis/Valkey is unreachable.
        ConfigurationError: `workflow` is not a workflow (a step, say).
    """
    _check_workflow(workflow, "start_async")
    queued = workflow.run_options.queued()
    if queued:
        raise ConfigurationError(
            f"{', '.join(queued)}: options of enqueue(), where a run waits in its queue; "
            f"start() executes the run here at once"
        )
    settings = workflow.run_options.settings or Settings.from_env()
    encoded = encode_run_call(workflow.id, args, kwargs, limit=settings.max_payload)
    run_id = workflow.run_options.run_id or derive_run_id(workflow.id, encoded[1])
    store = await open_store(settings)
    # Another caller of this run in this process (a task, a thread, a worker) is
    # told apart by its holder name: drive waits for it and returns its result.
    call = RunCall(
        store=store,
        workflow=workflow,
        run_id=run_id,
        args=args,
        kwargs=kwargs,
        encoded=encoded,
        settings=settings,
        queue=workflow.queue_tag(run_id),
        deadline=workflow.deadline,
    )
    result: R = await drive(call)
    return result


def start(workflow: Workflow[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Start or attach to a run of `workflow` from synchronous code; return its result.

    The blocking twin of `start_async`, for scripts; it runs its own event
    loop, so it cannot be called from inside one.
    """
    _check_workflow(workflow, "start")
    return blocking("start", lambda: start_async(workflow, *args, **kwargs))


async def enqueue_async(workflow: Workflow[P, R], /, *args: P.args, **kwargs: P.kwargs) -> str:
    """Put a run of `workflow` on its queue and return its run ID at once.

    Any worker that serves the queue and has the workflow (``werkfluss worker
    MODULE``) runs it, as the queue's limits allow. The run ID is chosen like
    `start_async`'s, so enqueueing the same call twice reaches the same run:
    an existing run is not started again (a failed or blocked one is put
    back on the queue to resume). With ``options(dedup=ID)``, a run
    enqueued with that ID that has not ended is returned instead of a new
    one; ``options(delay=..., at=...)`` leaves the run ``pending`` until then.

    Raises:
        RunConflictError: the run ID belongs to another workflow or other arguments.
        SerializationError: an argument cannot be stored.
        StorageError: Redis/Valkey is unreachable.
        ConfigurationError: `workflow` is not a workflow (a step, say), or a priority is
            given on a queue declared without ``priority=True``.
    """
    _check_workflow(workflow, "enqueue_async")
    options = workflow.run_options
    queue = options.queue or workflow.queue
    if options.priority is not None and not queue.priority:
        raise ConfigurationError(
            f"priority={options.priority} for a run of {workflow.id!r}, but queue {queue.name!r} is declared "
            f"without priority=True"
        )
    settings = options.settings or Settings.from_env()
    args_raw, canonical = encode_run_call(workflow.id, args, kwargs, limit=settings.max_payload)
    run_id = options.run_id or derive_run_id(workflow.id, canonical)
    store = await open_store(settings)
    await store.ensure_queue(queue)
    # A deduplication ID routes like a key: its runs share a partition, where it is claimed.
    tag = queue.tag_for(options.key if options.key is not None else options.dedup, run_id)
    if options.dedup is not None:
        holder = await _deduplicate(store, options.dedup, run_id, tag)
        if holder is not None:
            return holder
    # `at` is on the clock timers are due by (the server's, or a test clock's).
    delay = options.delay or (max(options.at - store.now(), 0.0) if options.at is not None else 0.0)
    priority = options.priority if options.priority is not None else DEFAULT_PRIORITY
    meta = f"{priority}|1|{options.key or ''}" if queue.limited else ""
    await submit_run(
        store, workflow.id, run_id, args_raw, canonical, tag=tag, meta=meta, delay=delay, deadline=workflow.deadline
    )
    return run_id


_ENDED = frozenset({"", "completed", "failed", "cancelled"})  # "" no such run (its enqueue died first)


async def _deduplicate(store: Store, dedup: str, run_id: str, tag: str) -> str | None:
    """The run that holds deduplication ID `dedup` and has not ended, or None once
    `run_id` holds it (taking it over from an ended run)."""
    holder = await store.claim_dedup(dedup, run_id, queue=tag)
    if not holder:
        return None
    if await store.status(holder) not in _ENDED:
        return holder
    # Ended: the ID is free again. Another enqueue may take it over first: then its run is returned.
    return await store.claim_dedup(dedup, run_id, queue=tag, previous=holder) or None


def enqueue(workflow: Workflow[P, R], /, *args: P.args, **kwargs: P.kwargs) -> str:
    """Blocking twin of `enqueue_async`: put a run on the queue, return its run ID."""
    _check_workflow(workflow, "enqueue")
    return blocking("enqueue", lambda: enqueue_async(workflow, *args, **kwargs))


_MAX_DELIVERY_KEY = 256  # characters: webhook event and delivery IDs are far shorter


def _check_delivery_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= _MAX_DELIVERY_KEY:
        shown = repr(key) if not isinstance(key, str) or len(key) <= 80 else f"{key[:80]!r}... ({len(key)} characters)"
        raise ConfigurationError(
            f"invalid hook delivery key {shown}: use a string of 1 to {_MAX_DELIVERY_KEY} characters"
        )
    return key


async def invoke_hook_async(
    token: str, payload: Any = None, *, key: str | None = None, settings: Settings | None = None
) -> bool:
    """Deliver `payload` to hook `token`, from any process, at any time.

    The payload is kept in the token's mailbox until a run takes it, so it
    may arrive before the run reaches its ``await``; the run that owns the
    token is woken. Payloads for a token no run has claimed yet are kept
    (see `pending_hooks` and `discard_hook`).

    Args:
        key: A delivery key (a webhook's event or delivery ID): the token
            stores one payload per key, so a sender's retry is a no-op,
            even after the run took the first payload or completed. The
            token's keys are forgotten with its mailbox (`expire_hooks`).
            Without a key every delivery is kept.

    Returns:
        True if the payload was stored; False if an earlier delivery with
        the same `key` was (this one stored nothing).

    Raises:
        SerializationError: the payload cannot be stored (nothing is delivered).
        HookClosedError: the token's run has completed or was cancelled (nothing is stored),
            unless this is a retry of a delivery with the same `key` (then False).
        ConfigurationError: the token or the key is not valid.
        StorageError: Redis/Valkey is unreachable.
    """
    check_token(token)
    if key is not None:
        _check_delivery_key(key)
    settings = settings or Settings.from_env()
    raw = encode_checked(payload, owner=f"hook {token!r}", where="payload", limit=settings.max_payload)
    store = await open_store(settings)
    # A run that ended will never take the payload. (A check, then a write: a run
    # ending in between keeps the payload in a mailbox that expire_hooks clears.)
    claimed = await store.hook_owner(token)
    if claimed:
        status = await store.status(claimed)
        if status in ("completed", "cancelled"):
            # A sender retrying a delivery the run already had gets the same answer as before it ended.
            if key is not None and await store.delivered(token, key):
                return False
            raise HookClosedError(token, claimed, status)
    stored, owner = await store.deliver(token, raw, key or "")
    if owner:
        # A duplicate whose payload still waits wakes the run too: the first sender may
        # have died before its wake-up.
        await store.wake(owner, queue=await store.queue_of(owner))
    return stored


def invoke_hook(token: str, payload: Any = None, *, key: str | None = None, settings: Settings | None = None) -> bool:
    """Blocking twin of `invoke_hook_async`: deliver `payload` to hook `token`; False for a repeated `key`."""
    return blocking("invoke_hook", lambda: invoke_hook_async(token, payload, key=key, settings=settings))


async def cancel_async(run_id: str, reason: str = "", *, settings: Settings | None = None) -> bool:
    """Cancel run `run_id` from any process.

    A paused, pending, interrupted or failed run is `cancelled` at once. A
    run that a live process is executing stops at its next step boundary
    (a step running in this process is cancelled through anyio
    cancellation; elsewhere within a third of the lease) and is recorded
    cancelled, with `reason` in its log. Starting a cancelled run raises
    `RunCancelledError`. Child runs it is waiting for are cancelled too.

    Returns False when the run had already completed or been cancelled.

    Raises:
        RunNotFoundError: there is no run `run_id`.
    """
    check_run_id(run_id)
    store = await open_store(settings or Settings.from_env())
    return await cancel_run(store, run_id, reason)


def cancel(run_id: str, reason: str = "", *, settings: Settings | None = None) -> bool:
    """Blocking twin of `cancel_async`: cancel run `run_id`."""
    return blocking("cancel", lambda: cancel_async(run_id, reason, settings=settings))


async def resume_async(run_id: str, *, settings: Settings | None = None) -> str:
    """Put run `run_id` back on the queue, for a worker to resume it.

    For a run that failed (after a fix or a transient outage), one that is
    blocked on a code change, one whose process died, or a paused run that
    should look at its hooks and timers now. Returns the run's status before.

    Raises:
        RunNotFoundError: there is no run `run_id`.
        RunConflictError: the run completed or was cancelled: there is nothing to resume.
    """
    check_run_id(run_id)
    store = await open_store(settings or Settings.from_env())
    state = await store.state(run_id)
    status = state.status
    if not status:
        raise RunNotFoundError(run_id)
    if status in ("completed", "cancelled"):
        raise RunConflictError(run_id, f"run {run_id!r} is {status}: there is nothing to resume")
    await store.enqueue(run_id, retry=status in ("failed", "blocked"), queue=state.queue)
    return status


def resume(run_id: str, *, settings: Settings | None = None) -> str:
    """Blocking twin of `resume_async`."""
    return blocking("resume", lambda: resume_async(run_id, settings=settings))


@dataclass(frozen=True, slots=True)
class PendingHook:
    """Payloads delivered to a hook token that no run has taken yet.

    Attributes:
        token: The hook's token.
        payloads: How many payloads wait in its mailbox.
        last_delivery: Unix time of the latest delivery.
        owner: The run that claimed the token, or None if no run has
            reached a hook with it yet.
    """

    token: str
    payloads: int
    last_delivery: float
    owner: str | None


async def pending_hooks_async(*, limit: int = 100, settings: Settings | None = None) -> list[PendingHook]:
    """Hook tokens with payloads no run has taken yet, oldest delivery first (at most `limit`).

    Raises:
        ConfigurationError: `limit` is not a whole number of at least 1.
        StorageError: Redis/Valkey is unreachable.
    """
    check_limit(limit)
    store = await open_store(settings or Settings.from_env())
    found = await store.pending_hooks(limit)
    return [PendingHook(token, count, last, owner or None) for token, last, count, owner in found if count]


def pending_hooks(*, limit: int = 100, settings: Settings | None = None) -> list[PendingHook]:
    """Blocking twin of `pending_hooks_async`."""
    return blocking("pending_hooks", lambda: pending_hooks_async(limit=limit, settings=settings))


async def expire_hooks_async(older_than: float | timedelta | str, *, settings: Settings | None = None) -> list[str]:
    """Discard payloads last delivered more than `older_than` ago that no run
    will take: their token has no owner, or its run has ended. Returns the tokens.
    """
    cutoff = time.time() - parse_duration(older_than, what="older_than")
    store = await open_store(settings or Settings.from_env())
    expired = []
    for token, last, _, owner in await store.pending_hooks(10_000):
        if last > cutoff:
            break
        if owner and await store.status(owner) in ("running", "paused", "pending"):
            continue
        await store.discard_hook(token)
        expired.append(token)
    return expired


def expire_hooks(older_than: float | timedelta | str, *, settings: Settings | None = None) -> list[str]:
    """Blocking twin of `expire_hooks_async`."""
    return blocking("expire_hooks", lambda: expire_hooks_async(older_than, settings=settings))
