"""The current run and the current step, carried in ContextVars, and what a run is to its body.

A step's sequence number is taken from the run's counter *when the step is
called*, not when it first runs, so `asyncio.gather`, task groups and loops
number their steps identically on every replay.

`Runner` is what the public calls (`Step.__call__`, a child `Workflow`
call, `hook()`, `sleep()`, `race()`) ask of the run they are in;
`StepLike` and `WorkflowLike` are what the runner reads of a step or a
workflow. The engine's executor implements `Runner` and is typed against
the other two, so neither the API nor the engine imports the other's
classes (the way Temporal's workflow API talks to its ``_Runtime``).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import NotInWorkflowError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import datetime

    from ._options import StepOptions

__all__ = [
    "RunContext",
    "Runner",
    "StepContext",
    "StepLike",
    "WorkflowLike",
    "current_run",
    "current_step",
    "step_key",
]


class StepLike(Protocol):
    """What a runner reads of a step (`werkfluss.Step`)."""

    @property
    def id(self) -> str:
        """The step ID, recorded with each of its results."""

    @property
    def fn(self) -> Callable[..., Awaitable[Any]]:
        """The body."""

    @property
    def options(self) -> StepOptions:
        """Its retry policy, timeout and argument check."""

    def return_type(self) -> Any:
        """The annotated return type: recorded results decode to it."""


class WorkflowLike(Protocol):
    """What a runner reads of a workflow (`werkfluss.Workflow`)."""

    @property
    def id(self) -> str:
        """The workflow ID, recorded with each of its runs."""

    @property
    def fn(self) -> Callable[..., Awaitable[Any]]:
        """The body."""

    @property
    def deadline(self) -> float | None:
        """The seconds a new run of it may take (None: no deadline)."""

    def return_type(self) -> Any:
        """The annotated return type: a recorded result decodes to it."""

    def decode_call(self, raw: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Recorded ``[args, kwargs]``, decoded to the body's parameter types."""

    def queue_tag(self, run_id: str, key: str | None = None) -> str:
        """The tag of the queue partition a new run `run_id` (of `key`) belongs to."""


class Runner(Protocol):
    """What the calls in a workflow body ask of the run they are in: each takes the
    call's sequence number, and returns what the log recorded for it or does it."""

    async def run_step(self, step: StepLike, seq: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Step `seq`'s result."""

    async def run_child(
        self, workflow: WorkflowLike, seq: int, child_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Child run `child_id`'s result."""

    async def sleep(self, seq: int, seconds: float | None = None, *, until: datetime | None = None) -> datetime | None:
        """Durable sleep `seq`: `seconds` long, or `until` a moment (then returns the recorded moment)."""

    async def receive(self, seq: int, token: str, n: int, type_: Any) -> Any:
        """Payload `n` of hook `seq` (`token`), decoded to `type_`."""

    async def race(self, seq: int, awaitables: list[Awaitable[Any]]) -> tuple[int, Any]:
        """The index and value of the first of `awaitables` to finish."""

    def patched(self, name: str, seq: int) -> bool:
        """Whether the body takes patch `name`'s new branch, reached before call `seq`."""

    def deprecate_patch(self, name: str, seq: int) -> None:
        """Patch `name`'s old branch is gone; reached before call `seq`."""


@dataclass(eq=False, slots=True)
class RunContext:
    """The run a workflow body is executing for."""

    run_id: str
    runner: Runner
    _seq: int = field(default=0)

    def next_seq(self) -> int:
        """Hand out the next step sequence number (1-based)."""
        self._seq += 1
        return self._seq

    def upcoming(self) -> int:
        """The sequence number the next call will take, without taking it."""
        return self._seq + 1


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
