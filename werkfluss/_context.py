"""The current run and the current step, carried in ContextVars.

A step's sequence number is taken from the run's counter *when the step is
called*, not when it first runs, so `asyncio.gather`, task groups and loops
number their steps identically on every replay.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._errors import NotInWorkflowError

if TYPE_CHECKING:
    from ._engine._executor import RunExecutor

__all__ = ["RunContext", "StepContext", "current_run", "current_step", "step_key"]


@dataclass(eq=False, slots=True)
class RunContext:
    """The run a workflow body is executing for."""

    run_id: str
    executor: RunExecutor
    _seq: int = field(default=0)

    def next_seq(self) -> int:
        """Hand out the next step sequence number (1-based)."""
        self._seq += 1
        return self._seq


@dataclass(frozen=True, slots=True)
class StepContext:
    """The step invocation a step body is executing for."""

    run_id: str
    step_id: str
    seq: int
    attempt: int

    @property
    def key(self) -> str:
        """Stable across retries, replays and processes: ``"<run_id>:<seq>"``."""
        return f"{self.run_id}:{self.seq}"


_run: ContextVar[RunContext | None] = ContextVar("werkfluss_run", default=None)
_step: ContextVar[StepContext | None] = ContextVar("werkfluss_step", default=None)


def current_run() -> RunContext | None:
    """The run whose workflow body is executing here, if any (None inside a step)."""
    return _run.get() if _step.get() is None else None


def current_step() -> StepContext | None:
    """The step invocation executing here, if any."""
    return _step.get()


def step_key() -> str:
    """A stable key for the running step invocation: run ID and sequence number.

    The same on every retry and every replay of this step in this run, so
    it can be passed as an idempotency key to payment APIs and the like:
    at-least-once steps become exactly-once effects where the other side
    deduplicates on the key.

    Raises:
        NotInWorkflowError: when called outside a running step.
    """
    ctx = _step.get()
    if ctx is None:
        raise NotInWorkflowError("step_key() can only be called inside a step that runs in a workflow")
    return ctx.key


def enter_run(ctx: RunContext) -> object:
    """Make `ctx` the current run; returns a token for `exit_run`."""
    return _run.set(ctx)


def exit_run(token: object) -> None:
    """Undo `enter_run`."""
    _run.reset(token)  # type: ignore[arg-type]


def enter_step(ctx: StepContext) -> object:
    """Make `ctx` the current step; returns a token for `exit_step`."""
    return _step.set(ctx)


def exit_step(token: object) -> None:
    """Undo `enter_step`."""
    _step.reset(token)  # type: ignore[arg-type]
