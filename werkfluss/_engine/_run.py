"""What every call in a run's body shares: the log it records to, the replay it
reads, and the checkpoint where a cancel, a shutdown or a lost lease takes effect.

`RunBase` is the state of one execution of a run; `_steps.StepCalls` (steps,
child runs) and `_waiting.WaitCalls` (sleeps, hooks, races) build on it, and
`_executor.RunExecutor` puts them together and runs the body.

Where the recorded history ends, an executor either goes on live
(``frontier="execute"``: it executes steps and waits) or stops the body
there (``"stop"``: a replay check, which touches no store).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import msgspec

from .._errors import HistoryTooLargeError, NonDeterminismError, _Suspend
from .._events import AnyEvent, encode_event
from .._logging import log
from .._values import call_digest, first_difference
from ._pause import Activity, Busy

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._context import WorkflowLike
    from .._holder import Holding
    from .._options import Settings
    from .._store import Store
    from ._call import ChildDriver
    from ._replay import Replay

__all__ = ["Frontier", "RunBase"]

# What an executor does where the recorded history ends: go on live, or stop the body there.
Frontier = Literal["execute", "stop"]


class RunBase:
    """One execution of a run's body, for a process that holds the run (epoch `epoch`)."""

    def __init__(
        self,
        store: Store,
        workflow: WorkflowLike,
        run_id: str,
        epoch: int,
        replay: Replay,
        settings: Settings,
        drive_child: ChildDriver,
        *,
        cancel: str | None = None,
        parent: str = "",
        inline: bool = False,
        holding: Holding | None = None,
        frontier: Frontier = "execute",
        queue: str = "",
    ) -> None:
        self.store = store
        self.queue = queue  # the tag of its queue partition: its timers and wake-ups live there
        self.workflow = workflow
        self.run_id = run_id
        self.epoch = epoch
        self.replay = replay
        self.settings = settings
        self.lease = settings.lease
        self.events = replay.count  # in the log, as far as this process knows
        self.warned = False  # about the history's length
        self.drive_child = drive_child
        self.lost = False
        self.diverged: NonDeterminismError | None = None
        self.cancel_reason = cancel
        self.parent = parent  # the run that started this one as a child
        self.inline = inline  # driven by the parent's own process
        self.ended = False  # its end (completed, failed, blocked, cancelled) is recorded
        self.cursors = dict(replay.cursors)
        self._tidied: dict[str, str] = {}  # token -> recorded entry removed from its mailbox again
        self.holding = holding  # the caller's claim in this process's registry: cancel() finds us there
        self.live = frontier == "execute"
        # With frontier="stop": the recorded calls the body made again, and the first it
        # made that the log has no outcome for (where the history ends).
        self.reached: set[int] | None = None if self.live else set()
        self.frontier: int | None = None
        self._body: anyio.CancelScope | None = None
        self._activity = Activity(run_id, settings.settle)
        # When its deadline passes (the timer clock's Unix time; None: none) and how long it
        # allowed (seconds), as stored with the run; and the child runs this execution
        # drives, cancelled with it if it is cancelled meanwhile.
        self.deadline: float | None = None
        self.allowed = 0.0
        self.driving: set[str] = set()
        # Called once when this execution first records something (an event, a pause, its
        # end): a worker trusts a redelivered run again once it got past where it was.
        self.on_progress: Callable[[], None] | None = None

    @property
    def stopping(self) -> bool:
        """The run is being handed back (`stop`)."""
        return self._activity.stopping

    def _progressed(self) -> None:
        if self.on_progress is not None:
            callback, self.on_progress = self.on_progress, None
            callback()

    def _note(
        self, level: int, event: str, message: str, *args: object, seq: int | None = None, step: str | None = None
    ) -> None:
        """Log `message` % (run ID, *`args`) at `level`, with `event`'s structured fields
        (`_logging`): the message names the run first."""
        if log.isEnabledFor(level):
            log.log(level, message, self.run_id, *args, extra=_fields(event, self.run_id, seq, step), stacklevel=2)

    def _note_step(self, level: int, event: str, seq: int, step: str, message: str, *args: object) -> None:
        """Log ``run <ID>: step #<seq> <step> `` + `message` % `args`, with the step's fields."""
        if log.isEnabledFor(level):
            fields = _fields(event, self.run_id, seq, step)
            log.log(level, "run %s: step #%d %s " + message, self.run_id, seq, step, *args, extra=fields, stacklevel=2)

    def check(self, seq: int, label: str) -> None:
        """Raise `NonDeterminismError` if the log recorded something else at `seq`."""
        if self.diverged is not None:
            raise self.diverged
        recorded = self.replay.labels.get(seq)
        if recorded is not None:
            if recorded != label:
                self.diverged = NonDeterminismError(self.run_id, seq, recorded, label)
                raise self.diverged
            if self.reached is not None:
                self.reached.add(seq)

    def check_args(
        self,
        seq: int,
        label: str,
        digest: bytes | None,
        recorded: bytes | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Raise `NonDeterminismError` if call `seq` now has other arguments than recorded.

        Only the step's ID used to be compared, so a replay that computed another
        argument (a dict walked in another order) was silently handed the result
        recorded for the old one.
        """
        if digest is None:
            return  # recorded before digests, or by a step that opted out
        try:
            if call_digest(args, kwargs) == digest:
                return
            now = b"?"
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
            now = b""
        if not now:
            detail = "an argument cannot be stored now"
        elif recorded is None:
            detail = "their digest differs from the recorded failed call's"
        else:
            detail = first_difference(recorded, args, kwargs)
        self.diverged = NonDeterminismError(self.run_id, seq, label, label, arguments=detail)
        raise self.diverged

    async def record(self, dedup: str, event: AnyEvent) -> None:
        """Append one event to the log (fenced, first writer wins).

        Raises:
            HistoryTooLargeError: the log holds `Settings.max_history` events already.
        """
        if self.events >= self.settings.max_history:
            raise HistoryTooLargeError(self.run_id, self.events, self.settings.max_history)
        with Busy(self._activity, track=False):  # its caller's task is tracked already, where it matters
            n, cancel = await self.store.append(
                self.run_id, self.epoch, dedup, encode_event(event), self.lease, seen=self.events
            )
        self._progressed()
        self.events = max(self.events, n)
        if self.events >= self.settings.history_warning and not self.warned:
            self.warned = True
            limit = self.settings.max_history
            message = "run %s: its log has %d events; it fails at %d (max_history)"
            self._note(logging.WARNING, "run.history", message, self.events, limit)
        if cancel is not None:
            self.request_cancel(cancel)

    def request_cancel(self, reason: str) -> None:
        """Stop the body at its next checkpoint; the run ends cancelled."""
        if self.cancel_reason is None:
            log.info("run %s: cancelling it (%s)", self.run_id, reason or "no reason")
        self.cancel_reason = reason
        if self._body is not None:
            self._body.cancel()

    def stop(self) -> None:
        """Hand the run back at the next step boundary (a worker shutting down);
        a run that only waits pauses instead."""
        self._activity.stop()

    async def _checkpoint(self, *, held: bool = False) -> None:
        """Where a cancel or a shutdown takes effect, and a full log refuses more:
        before anything live runs (`held`: by a step inside `busy()`, between attempts).

        A cancel stops the body at once. A shutdown only starts nothing new: the
        steps already executing in parallel finish and are recorded, and the
        watcher hands the run back once none is left.
        """
        if self.lost:
            # Its lease is lost: a step started now could run beside another process's.
            raise _Suspend(self.run_id, "this process lost the run's lease; it starts nothing more")
        if self.events >= self.settings.max_history:
            raise HistoryTooLargeError(self.run_id, self.events, self.settings.max_history)
        if self._body is None:
            return
        if self.cancel_reason is not None:
            self._body.cancel()
            await anyio.lowlevel.checkpoint()
        elif self._activity.stopping:
            await self._activity.hold_back(held=held)

    async def _history_ends(self, seq: int) -> Any:
        """With frontier="stop": the body reached call `seq`, which the log has no outcome
        for. Note where the history ends, and stop the body."""
        if self.frontier is None or seq < self.frontier:
            self.frontier = seq
        if self._body is not None:
            self._body.cancel()
        await anyio.sleep_forever()


def _fields(event: str, run_id: str, seq: int | None, step: str | None) -> dict[str, object]:
    """The structured fields of a record about a run (`_logging`)."""
    return {"werkfluss_event": event, "werkfluss_run": run_id, "werkfluss_seq": seq, "werkfluss_step": step}
