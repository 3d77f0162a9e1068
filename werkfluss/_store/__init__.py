"""The storage boundary: every Redis key and script of werkfluss, behind one `RedisStore`, and its Protocols.

`RedisStore` is composed of one class per family of keys, each in its own
module with the Lua it sends, and all on one connection (`_connect`):

- `_runs` (who holds a run), `_run_log` (what it records: the hot path) and
  `_run_reads` (what its keys hold): ``P{R}:state``, ``:log``, ``:steps``, the run index;
- `_hooks`: a hook token's mailbox (``P{hook:T}:...``);
- `_timers` and `_queue`: the shared queue, its timers and dead letters (``P{q}:...``).

Each family is one Redis Cluster hash slot per run, token or queue, and a
script never touches two families, so each is atomic on a cluster too. The
key layout and every state field are in `_keys`; the fast lane, the store's
own path for hot commands, in `_lane`. Every run write first compares the
run's epoch (fencing) and is idempotent where redis-py may re-send it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from . import _hooks, _queue, _run_log, _runs, _timers
from ._connect import Script
from ._deadline import CALL_DEADLINE, SOCKET_TIMEOUT
from ._hooks import RedisHooks
from ._keys import RunState, StateField
from ._queue import RedisQueue
from ._run_log import RedisRunLog
from ._run_reads import RedisRunReads
from ._runs import AcquireKind, AcquireResult, RedisRuns
from ._timers import RedisTimers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from .._events import ErrorInfo

__all__ = [
    "CALL_DEADLINE",
    "SCRIPTS",
    "SOCKET_TIMEOUT",
    "AcquireKind",
    "AcquireResult",
    "HookStore",
    "QueueStore",
    "RedisStore",
    "RunState",
    "RunStore",
    "Script",
    "StateField",
    "Store",
]

SCRIPTS: tuple[Script, ...] = (*_runs.SCRIPTS, *_run_log.SCRIPTS, *_hooks.SCRIPTS, *_timers.SCRIPTS, *_queue.SCRIPTS)
"""Every Lua script the store runs, by family (for tools naming an ``EVALSHA`` by its SHA)."""


class RunStore(Protocol):
    """What the engine asks of a run's keys: hold it, record its events, end it, read it back."""

    def now(self) -> float:
        """The server's clock, as Unix time."""
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
    ) -> AcquireResult:
        """Create run `run_id` or take it over."""
        ...

    async def create(self, run_id: str, *, workflow: str, started: bytes, args_digest: str) -> tuple[str, str]:
        """Create a pending run for the queue."""
        ...

    async def renew(self, run_id: str, epoch: int, lease: float) -> tuple[bool, str | None]:
        """Extend the lease: ``(held, cancel reason or None)``."""
        ...

    async def release(self, run_id: str, epoch: int, *, pending: bool = False) -> None:
        """Give up the lease at once."""
        ...

    async def cancel(self, run_id: str, reason: str, event: bytes) -> tuple[str, str]:
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
    """What workers and waits ask of the shared queue, its timers and dead letters."""

    async def wake(self, run_id: str, at: float | None = None) -> None:
        """Make run `run_id` due at Unix time `at` (default now), unless it is due sooner."""
        ...

    async def reschedule(self, run_id: str, at: float | None) -> None:
        """Set (or with None remove) the run's timer, keeping a wake-up that is already due."""
        ...

    async def unschedule(self, run_id: str) -> None:
        """Remove the run's timer entry."""
        ...

    async def due(self, run_ids: list[str]) -> list[float | None]:
        """When each run is due next (Unix time), None for no entry."""
        ...

    async def claim_timer(self, run_id: str, push: float) -> bool:
        """Take the run's due timer entry by pushing it `push` seconds ahead."""
        ...

    async def move_due(self, limit: int = 100) -> tuple[int, float | None]:
        """Move due timers to the queue: ``(moved, seconds until the next is due)``."""
        ...

    async def wait_for_nudge(self, block: float) -> bool:
        """Block up to `block` seconds for a nudge; returns whether one came."""
        ...

    async def claim_sweep(self, holder: str, seconds: float, *, key: str = ...) -> bool:
        """Whether `holder` may sweep the run index for stuck runs now."""
        ...

    async def queued_runs(self, limit: int) -> set[str] | None:
        """The runs with a message in the queue, or None when it holds more than `limit`."""
        ...

    async def ensure_group(self, group: str) -> None:
        """Create the consumer group if missing."""
        ...

    async def enqueue(self, run_id: str, *, retry: bool = False) -> str:
        """Put "run or resume `run_id`" on the queue; returns the message ID."""
        ...

    async def read_queue(self, group: str, consumer: str, count: int, block: float) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` new messages for `consumer`, waiting up to `block` seconds."""
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
    ) -> tuple[list[tuple[str, dict[str, str], bool]], list[tuple[str, str]]]:
        """Claim messages idle longer than `min_idle` seconds, dead-lettering the too often delivered."""
        ...

    async def end_probation(self, consumer: str, message: str) -> None:
        """`consumer`'s suspect `message` proved itself (or ended)."""
        ...

    async def touch(self, group: str, consumer: str, ids: list[str]) -> set[str]:
        """Reset the idle time of messages `consumer` still owns; returns those."""
        ...

    async def ack(self, group: str, *ids: str) -> None:
        """Acknowledge and delete messages whose progress is in the log."""
        ...

    async def requeue(self, group: str, message: str, run_id: str, *, retry: bool = False) -> None:
        """Hand a message back as a fresh one, readable at once."""
        ...

    async def note_error(self, message: str, error: str) -> None:
        """Remember the last error a worker hit on `message`."""
        ...

    async def dead_letter(self, group: str, message: str, run_id: str, reason: str) -> None:
        """Move `message` to the dead letters with `reason`."""
        ...

    async def bury(self, run_id: str, source: str, reason: str) -> None:
        """Add a dead letter for something other than a queue message."""
        ...

    async def dead_letters(self, limit: int) -> list[tuple[str, dict[str, str]]]:
        """The dead letters, oldest first."""
        ...

    async def redrive(self, dead_id: str) -> str:
        """Put a dead letter's run back on the queue; returns the new message ID or ``""``."""
        ...

    async def queue_depth(self, group: str) -> tuple[int, int]:
        """``(messages not yet delivered, messages pending)`` for `group`."""
        ...


class Store(RunStore, HookStore, QueueStore, Protocol):
    """All three: what an executing run asks of the store (`RedisStore` is one)."""


class RedisStore(RedisRuns, RedisRunLog, RedisRunReads, RedisHooks, RedisTimers, RedisQueue):
    """The run log and run state, hooks, timers and the queue on one Redis/Valkey server or one Redis Cluster.

    Connect with `RedisStore.connect`; on a cluster every script's keys share
    one hash slot, so the same calls work on both kinds of client.
    The engine and the worker are typed against `RunStore`, `HookStore`,
    `QueueStore` or `Store` instead of this class.
    """
