"""The storage boundary: every Redis key and script of werkfluss, behind one `RedisStore`, and its Protocols.

`RedisStore` is composed of one class per family of keys, each in its own
module with the Lua it sends, and all on one connection (`_connect`):

- `_runs` (who holds a run), `_run_log` (what it records: the hot path),
  `_run_reads` (what its keys hold) and `_fork` (a run started from another's
  log): ``P{R}:state``, ``:log``, ``:steps``, the run index;
- `_hooks`: a hook token's mailbox (``P{hook:T}:...``);
- `_timers`, `_queue` and `_flow`: each queue partition's stream, timers, dead
  letters and flow control (``P{q}:...``, ``P{q:N}:...``).
- `_schedules`: a schedule's state (``P{s:N}:schedule``).

Each family is one Redis Cluster hash slot per run, token or queue partition, and a
script never touches two families, so each is atomic on a cluster too. The
key layout and every state field are in `_keys`; the fast lane, the store's
own path for hot commands, in `_lane`. Every run write first compares the
run's epoch (fencing) and is idempotent where redis-py may re-send it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from . import _flow, _fork, _hooks, _queue, _run_log, _runs, _schedules, _timers
from ._connect import Script
from ._deadline import CALL_DEADLINE, SOCKET_TIMEOUT
from ._flow import QueueFigures, RedisFlow
from ._fork import RedisForks
from ._hooks import RedisHooks
from ._keys import RunState, StateField
from ._queue import RedisQueue
from ._run_log import RedisRunLog
from ._run_reads import RedisRunReads
from ._runs import AcquireKind, AcquireResult, RedisRuns
from ._schedules import RedisSchedules
from ._timers import RedisTimers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from .._events import ErrorInfo
    from .._queues import Queue

__all__ = [
    "CALL_DEADLINE",
    "SCRIPTS",
    "SOCKET_TIMEOUT",
    "AcquireKind",
    "AcquireResult",
    "HookStore",
    "QueueFigures",
    "QueueStore",
    "RedisStore",
    "RunState",
    "RunStore",
    "Script",
    "StateField",
    "Store",
]

SCRIPTS: tuple[Script, ...] = (
    *_runs.SCRIPTS,
    *_run_log.SCRIPTS,
    *_hooks.SCRIPTS,
    *_timers.SCRIPTS,
    *_queue.SCRIPTS,
    *_flow.SCRIPTS,
    *_schedules.SCRIPTS,
    *_fork.SCRIPTS,
)
"""Every Lua script the store runs, by family (for tools naming an ``EVALSHA`` by its SHA)."""


class RunStore(Protocol):
    """What the engine asks of a run's keys: hold it, record its events, end it, read it back."""

    prefix: str  # the key prefix: whose test clock (`werkfluss._clock`) the store's `now` follows

    def now(self) -> float:
        """The time timers are due by, as Unix time: the server's clock, or a test clock's."""
        ...

    def server_now(self) -> float:
        """The server's clock, as Unix time: what leases run out by."""
        ...

    async def acquire(
        self,
        run_id: str,
        *,
        workflow: str,
        holder: str,
        lease: float,
        started: bytes,
        resumed: bytes,
        take_over: str = "",
        args_digest: str = "",
        retry: bool = True,
        parent: str = "",
        process: str = "",
        queue: str = "",
        route: str = "",
        deadline: float | None = None,
    ) -> AcquireResult:
        """Create run `run_id` (with `deadline` seconds to finish) or take it over."""
        ...

    async def create(
        self,
        run_id: str,
        *,
        workflow: str,
        started: bytes,
        args_digest: str,
        queue: str = "",
        delay: float = 0,
        deadline: float | None = None,
    ) -> tuple[str, str, str]:
        """Create a pending run for the queue: ``(kind, detail, its queue)``."""
        ...

    async def renew(self, run_id: str, epoch: int, lease: float) -> tuple[bool, str | None]:
        """Extend the lease: ``(held, cancel reason or None)``."""
        ...

    async def release(self, run_id: str, epoch: int, *, pending: bool = False) -> None:
        """Give up the lease at once."""
        ...

    async def cancel(self, run_id: str, reason: str, event: bytes, *, gone: str = "") -> tuple[str, str]:
        """Cancel a run: ``(outcome, parent)``."""
        ...

    async def append(
        self, run_id: str, epoch: int, dedup: str, event: bytes, lease: float, *, seen: int | None = None
    ) -> tuple[int, str | None]:
        """Append an event once per `dedup` field: ``(index or 0, cancel reason)``."""
        ...

    async def pause(
        self, run_id: str, epoch: int, event: bytes, waiting: bytes, *, seen: int | None = None
    ) -> str | None:
        """Park the run; returns a pending cancel's reason instead, if there is one."""
        ...

    async def complete(self, run_id: str, epoch: int, result: bytes, *, seen: int | None = None) -> str:
        """Record that the run returned `result`; returns its parent run or ``""``."""
        ...

    async def fail(
        self, run_id: str, epoch: int, error: ErrorInfo, *, seq: int | None = None, seen: int | None = None
    ) -> str:
        """Record that the run failed with `error`; returns its parent run or ``""``."""
        ...

    async def block(self, run_id: str, epoch: int, error: ErrorInfo, *, seen: int | None = None) -> str:
        """Record that the run's replay diverged; returns its parent run or ``""``."""
        ...

    async def mark_cancelled(self, run_id: str, epoch: int, reason: str, *, seen: int | None = None) -> str:
        """Record that the run stopped for a cancel; returns its parent run or ``""``."""
        ...

    async def state(self, run_id: str) -> RunState:
        """The run's state."""
        ...

    async def states(self, run_ids: list[str], fields: tuple[StateField, ...]) -> list[RunState]:
        """`fields` of many runs' states in one round trip."""
        ...

    async def status(self, run_id: str) -> str:
        """The run's status, ``""`` if there is no such run."""
        ...

    async def queue_of(self, run_id: str) -> str:
        """The tag of the run's queue partition (``q``: the default queue)."""
        ...

    async def log_ends(self, run_id: str, newest: int) -> tuple[bytes | None, list[bytes | None]]:
        """The run's first event and its `newest` last ones (newest first), undecoded."""
        ...

    async def runs_by_time(self, top: str, offset: int, count: int) -> list[tuple[str, int]]:
        """``(run ID, creation ms)`` from the run index, newest first."""
        ...

    def read_log(self, run_id: str) -> AsyncIterator[list[tuple[int, bytes | None]]]:
        """The run's log in batches of ``(index, encoded event)``, oldest first."""
        ...


class HookStore(Protocol):
    """What hooks ask of a token's mailbox."""

    async def deliver(self, token: str, payload: bytes, key: str = "") -> tuple[bool, str]:
        """Store a payload for `token`, once per delivery `key`: ``(stored, owner)``."""
        ...

    async def delivered(self, token: str, key: str) -> bool:
        """Whether a delivery with `key` was stored for `token`."""
        ...

    async def take(self, token: str, run_id: str, after: str) -> tuple[str, str, bytes | None]:
        """Claim `token` for `run_id` and peek at its next payload after entry `after`."""
        ...

    async def consumed(self, token: str, entry: str) -> None:
        """Drop a payload the run recorded."""
        ...

    async def hook_owner(self, token: str) -> str:
        """The run that claimed hook `token`, ``""`` if none has."""
        ...

    async def pending_hooks(self, limit: int) -> list[tuple[str, float, int, str]]:
        """Tokens with payloads waiting: ``(token, last delivery, count, owner)``."""
        ...

    async def discard_hook(self, token: str) -> None:
        """Delete the payloads waiting for `token`."""
        ...


class QueueStore(Protocol):
    """What workers and waits ask of a queue partition (its tag is `queue`, ``q`` the default queue's):
    its stream, timers, dead letters and flow control."""

    async def wake(self, run_id: str, after: float = 0.0, *, queue: str = ...) -> None:
        """Make run `run_id` due `after` seconds from now (default: now), unless it is due sooner."""
        ...

    async def reschedule(self, run_id: str, at: float | None, *, queue: str = ...) -> None:
        """Set (or with None remove) the run's timer, keeping a wake-up that is already due."""
        ...

    async def unschedule(self, run_id: str, *, queue: str = ...) -> None:
        """Remove the run's timer entry."""
        ...

    async def due(self, run_ids: list[str], *, queue: str = ...) -> list[float | None]:
        """When each run is due next (Unix time), None for no entry."""
        ...

    async def claim_timer(self, run_id: str, push: float, *, queue: str = ...) -> bool:
        """Take the run's due timer entry by pushing it `push` seconds ahead."""
        ...

    async def move_due(self, limit: int = 100, *, queue: str = ...) -> tuple[int, float | None]:
        """Move due timers and delayed starts to the queue: ``(moved, seconds until the next is due)``."""
        ...

    async def wait_for_nudge(self, block: float, *, queue: str = ...) -> bool:
        """Block up to `block` seconds for a nudge; returns whether one came."""
        ...

    async def claim_sweep(self, holder: str, seconds: float, *, key: str = ...) -> bool:
        """Whether `holder` may sweep the run index for stuck runs now."""
        ...

    async def queued_runs(self, limit: int, *, queue: str = ...) -> set[str] | None:
        """The runs with a message in the queue (or waiting for admission or a delayed
        start), or None when it holds more than `limit` messages."""
        ...

    async def ensure_group(self, group: str, *, queue: str = ...) -> None:
        """Create the consumer group if missing."""
        ...

    async def enqueue(self, run_id: str, *, retry: bool = False, queue: str = ...) -> None:
        """Put "run or resume `run_id`" on the queue (on one with limits: to wait for admission)."""
        ...

    async def submit(self, run_id: str, *, queue: str, retry: bool = False, meta: str = "", delay: float = 0) -> int:
        """Enqueue with the run's meta (priority, key) and an optional delay; returns when it is due (ms)."""
        ...

    async def read_queue(
        self, group: str, consumer: str, count: int, block: float, *, queue: str = ...
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` new messages for `consumer`, waiting up to `block` seconds."""
        ...

    async def admit(
        self, group: str, consumer: str, count: int, *, queue: str
    ) -> tuple[list[tuple[str, dict[str, str]]], float | None, int]:
        """Admit up to `count` runs of a limited queue and read them for `consumer`."""
        ...

    async def wait_for_bell(self, block: float, *, queue: str) -> bool:
        """Block up to `block` seconds until a limited queue may admit a run."""
        ...

    async def declare_queue(self, tag: str, config: dict[str, str], *, stands: float = ...) -> str | None:
        """Store (or refresh) a queue partition's limits; returns None, or a different recent declaration."""
        ...

    async def ensure_queue(self, queue: Queue, *, refresh: bool = False) -> str | None:
        """Declare `queue`'s limits on the server, once per connection (again with `refresh`);
        returns why another declaration stays in force, if one does."""
        ...

    async def known_queues(self) -> dict[str, int]:
        """The queues declared on this server (with limits): name -> partitions."""
        ...

    async def queue_config(self, tag: str) -> dict[str, str]:
        """A queue partition's stored declaration and counters."""
        ...

    async def queue_figures(self, tag: str, *, group: str, keys: int = 1000) -> QueueFigures:
        """A queue partition's figures (runs waiting, admitted, delayed, messages, busy keys), read in one call."""
        ...

    async def why_waiting(self, run_id: str, *, queue: str, group: str, look: int = 1000) -> list[str]:
        """Why a run has not started on queue partition `queue` (``[""]``: it does not wait there)."""
        ...

    async def claim_dedup(self, dedup: str, run_id: str, *, queue: str, previous: str = "") -> str:
        """Claim a deduplication ID for `run_id`; ``""`` if claimed, else the run holding it."""
        ...

    async def forget_waiting(self, run_id: str, *, queue: str) -> None:
        """Stop a run from waiting for admission or its delayed start."""
        ...

    async def reclaim(
        self,
        group: str,
        consumer: str,
        min_idle: float,
        count: int,
        max_deliveries: int,
        *,
        suspect: bool = True,
        held: Sequence[str] = (),
        queue: str = ...,
    ) -> tuple[list[tuple[str, dict[str, str], bool]], list[tuple[str, str]]]:
        """Claim messages idle longer than `min_idle` seconds, dead-lettering the too often delivered."""
        ...

    async def end_probation(self, consumer: str, message: str, *, queue: str = ...) -> None:
        """`consumer`'s suspect `message` proved itself (or ended)."""
        ...

    async def touch(self, group: str, consumer: str, ids: list[str], *, queue: str = ...) -> set[str]:
        """Reset the idle time of messages `consumer` still owns; returns those."""
        ...

    async def ack(self, group: str, message: str, run_id: str = "", *, ended: bool = False, queue: str = ...) -> None:
        """Acknowledge and delete a message whose progress is in the log, freeing its run's slot."""
        ...

    async def requeue(self, group: str, message: str, run_id: str, *, retry: bool = False, queue: str = ...) -> None:
        """Hand a message back as a fresh one, readable at once."""
        ...

    async def note_error(self, message: str, error: str, *, queue: str = ...) -> None:
        """Remember the last error a worker hit on `message`."""
        ...

    async def dead_letter(self, group: str, message: str, run_id: str, reason: str, *, queue: str = ...) -> None:
        """Move `message` to the dead letters with `reason`."""
        ...

    async def bury(self, run_id: str, source: str, reason: str, *, queue: str = ...) -> None:
        """Add a dead letter for something other than a queue message."""
        ...

    async def dead_letters(self, limit: int, *, queue: str = ...) -> list[tuple[str, dict[str, str]]]:
        """The dead letters, oldest first."""
        ...

    async def redrive(self, dead_id: str, *, queue: str = ...) -> str:
        """Put a dead letter's run back on its queue; returns the dead letter's ID or ``""``."""
        ...

    async def queue_depth(self, group: str, *, queue: str = ...) -> tuple[int, int]:
        """``(messages not yet delivered, messages pending)`` for `group`."""
        ...


class Store(RunStore, HookStore, QueueStore, Protocol):
    """All three: what an executing run asks of the store (`RedisStore` is one)."""


class RedisStore(
    RedisRuns, RedisRunLog, RedisRunReads, RedisHooks, RedisTimers, RedisQueue, RedisFlow, RedisSchedules, RedisForks
):
    """The run log and run state, hooks, timers and the queue on one Redis/Valkey server or one Redis Cluster.

    Connect with `RedisStore.connect`; on a cluster every script's keys share
    one hash slot, so the same calls work on both kinds of client.
    The engine and the worker are typed against `RunStore`, `HookStore`,
    `QueueStore` or `Store` instead of this class.
    """
