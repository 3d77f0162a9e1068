"""`submit_run`: create a pending run and put it on its queue partition, idempotently by run ID.

What `enqueue_async` does once it has a run ID, shared with the workers'
scheduler (which may not import the API layer): a tick of a schedule is
enqueued exactly like any other run. Creating the run and submitting it
are two calls (the run's slot and the queue's); a caller that dies between
them leaves a ``pending`` run without a message, which the next submit of
the same run ID finds and submits again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec

from .._errors import RunConflictError
from .._events import RunStarted, encode_event
from ._attach import args_digest

if TYPE_CHECKING:
    from .._store import Store

__all__ = ["submit_run"]


async def submit_run(
    store: Store,
    workflow_id: str,
    run_id: str,
    args_raw: bytes,
    canonical: bytes,
    *,
    tag: str,
    meta: str,
    delay: float = 0.0,
    deadline: float | None = None,
) -> str:
    """Create run `run_id` of `workflow_id` on queue partition `tag` and submit it; returns
    ``"new"``, or the status of the run that existed (a failed or blocked one is put back on
    its queue to resume, a pending one whose submit may have died is submitted again).
    A new run gets `deadline` seconds from now to finish (None: no deadline).

    Raises:
        RunConflictError: the run ID belongs to another workflow or other arguments.
    """
    started = encode_event(RunStarted(time.time(), workflow_id, msgspec.Raw(args_raw)))
    kind, detail, home = await store.create(
        run_id,
        workflow=workflow_id,
        started=started,
        args_digest=args_digest(canonical),
        queue=tag,
        delay=delay,
        deadline=deadline,
    )
    if kind == "conflict":
        raise RunConflictError(run_id, f"run {run_id!r} belongs to workflow {detail!r}, not {workflow_id!r}")
    if kind == "other-arguments":
        raise RunConflictError(run_id, f"run {run_id!r} was enqueued with other arguments; use another run_id")
    if kind == "new":
        await store.submit(run_id, queue=tag, meta=meta, delay=delay)
        return "new"
    if detail == "pending":  # its enqueue may have died before queueing it
        await store.submit(run_id, queue=home or tag, meta=meta, delay=delay)
    elif detail in ("failed", "blocked"):
        await store.submit(run_id, queue=home or tag, retry=True)
    return detail
