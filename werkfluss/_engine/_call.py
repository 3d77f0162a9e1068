"""`RunCall`: one call of a workflow under a run ID, as `drive` takes it.

`start()` makes one for its run, and the executor one for each child run it
drives (through its `ChildDriver`), so these calls pass one value instead of
eight positional arguments.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .._context import WorkflowLike
    from .._options import Settings
    from .._store import Store

__all__ = ["ChildDriver", "RunCall"]


class RunCall(msgspec.Struct, frozen=True, kw_only=True):
    """A call of `workflow` as run `run_id`: what to start, or to attach to if it exists.

    `encoded` is the arguments encoded twice: as given (stored, so the body
    sees a dict's keys in the caller's order) and canonically (compared, to
    refuse another call under the same run ID). `parent` is the run that
    drives this one as its child, ``""`` for a run of its own; `queue` the tag
    of the queue partition a new run belongs to (``""``: the default queue);
    `deadline` the seconds a new run may take (None: no deadline).
    """

    store: Store
    workflow: WorkflowLike
    run_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    encoded: tuple[bytes, bytes]
    settings: Settings
    parent: str = ""
    queue: str = ""
    deadline: float | None = None


# How an executor drives a child run (`_drive.drive_child`, handed in: the engine's driver
# imports the executor, not the other way round). Returns the child's result, or `Paused`.
ChildDriver = Callable[[RunCall], Awaitable[Any]]
