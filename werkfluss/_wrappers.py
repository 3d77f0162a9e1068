"""`step()` and `workflow()`: typed wrappers around plain coroutine functions.

Both work as bare decorators, as decorators with options, and as plain
wrappers (``fetch = step(fetch_async)``); ParamSpec keeps the wrapped
signature for mypy and IDEs.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Generic, ParamSpec, TypeVar, final, overload

import msgspec

from ._context import current_run, current_step
from ._engine._run_deadline import check_deadline
from ._errors import ConfigurationError, NotInWorkflowError, SerializationError
from ._ids import callable_id, check_run_id, child_run_id, register
from ._options import RetryPolicy, Settings, StepOptions, parse_duration, step_options
from ._queues import MAX_PRIORITY, Queue, default_queue, queue_named
from ._values import decode_value

if typing.TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from datetime import datetime, timedelta

__all__ = ["Step", "Workflow", "step", "workflow"]

P = ParamSpec("P")
R = TypeVar("R")

_UNSET: Any = object()


def _check_async(fn: object, kind: str) -> None:
    if not callable(fn):
        raise ConfigurationError(f"{kind}() needs an async function, got {fn!r}")
    if not inspect.iscoroutinefunction(fn):
        name = getattr(fn, "__qualname__", repr(fn))
        raise ConfigurationError(
            f"{kind}() needs an async function, but {name} is not 'async def'. Wrap it: "
            f"'async def {getattr(fn, '__name__', 'f')}(...): return <sync call>(...)'"
        )


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: decode untyped
        return {}


def _return_type(fn: Callable[..., Any]) -> Any:
    return _hints(fn).get("return", Any)


class _Wrapper:
    """What steps and workflows share: the wrapped function, its ID, its return type."""

    fn: Callable[..., Awaitable[Any]]
    id: str

    def _wrap(self, fn: Callable[..., Awaitable[Any]], kind: str, name: str | None, *, claim: bool) -> None:
        _check_async(fn, kind)
        # First: update_wrapper copies fn.__dict__, which must not override ours.
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]  # the subclasses are callable
        self.fn = fn
        self.id = callable_id(fn, name)
        if claim:
            # A workflow is registered as itself too: what a worker runs under its ID.
            register(self.id, kind, fn, self if kind == "workflow" else None)
        self._return_type: Any = _UNSET

    def return_type(self) -> Any:
        """The annotated return type, resolved once (results decode to it on replay)."""
        if self._return_type is _UNSET:
            self._return_type = _return_type(self.fn)
        return self._return_type


@final
class Step(_Wrapper, Generic[P, R]):
    """A durable step: its result is recorded once, and replayed on reruns.

    Inside a workflow run, calling the step takes the next sequence number
    at once; awaiting it returns the recorded result, or executes the body
    (with retries and a timeout) and records it. Outside a run, or inside
    another step, the body runs as a plain coroutine.
    """

    fn: Callable[P, Awaitable[R]]

    def __init__(self, fn: Callable[P, Awaitable[R]], *, name: str | None, options: StepOptions) -> None:
        self._wrap(fn, "step", name, claim=True)
        self.options = options

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        run = current_run()
        if run is None:
            return self._plain(*args, **kwargs)
        return run.runner.run_step(self, run.next_seq(), args, kwargs)

    async def _plain(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<werkfluss step {self.id}>"


_MAX_KEY = 256  # characters of a flow-control key or a deduplication ID


class RunOptions:
    """Options of one start of a workflow: its run ID, storage settings, its deadline, and
    how it waits in its queue (key, priority, delay, deduplication ID; `enqueue` only)."""

    __slots__ = ("at", "deadline", "dedup", "delay", "key", "priority", "queue", "run_id", "settings")

    def __init__(self, run_id: str | None = None, settings: Settings | None = None) -> None:
        self.run_id = run_id
        self.settings = settings
        self.key: str | None = None
        self.priority: int | None = None
        self.delay: float | None = None
        self.at: float | None = None  # Unix time
        self.dedup: str | None = None
        self.queue: Queue | None = None
        self.deadline: float | None = None  # seconds, instead of the workflow's

    def queued(self) -> list[str]:
        """The names of the options only `enqueue` takes that are set."""
        names = ("key", "priority", "delay", "at", "dedup")
        return [name for name in names if getattr(self, name) is not None]


def _text_option(value: object, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_KEY:
        raise ConfigurationError(f"invalid {what} {value!r}: use a string of 1 to {_MAX_KEY} characters")
    return value


def _when(at: datetime | float) -> float:
    """Unix time from a timezone-aware datetime or a number."""
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        return float(at)
    if hasattr(at, "timestamp") and getattr(at, "tzinfo", None) is not None:
        return float(at.timestamp())
    raise ConfigurationError(f"invalid at={at!r}: use a timezone-aware datetime or a Unix time")


@final
class Workflow(_Wrapper, Generic[P, R]):
    """A durable workflow: start it with `start()`, `start_async()`.

    Its body must be deterministic between steps: the same arguments and
    step results must lead to the same steps in the same order.
    """

    fn: Callable[P, Awaitable[R]]

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str | None,
        run_options: RunOptions | None = None,
        queue: Queue | str | None = None,
        deadline: float | timedelta | str | None = None,
    ) -> None:
        # Before the ID is claimed: a definition refused for an unknown queue or a bad
        # deadline leaves nothing registered.
        resolved = default_queue() if queue is None else queue_named(queue)
        seconds = None
        if deadline is not None:
            _check_async(fn, "workflow")
            seconds = check_deadline(deadline, callable_id(fn, name))
        # A bound copy (`options()`) is the same definition: only the original claims the ID.
        self._wrap(fn, "workflow", name, claim=run_options is None)
        self.run_options = run_options or RunOptions()
        self.queue: Queue = resolved
        self._deadline = seconds

    @property
    def deadline(self) -> float | None:
        """The seconds a new run of it may take from its creation: the ``options(deadline=...)``
        of this copy, or the workflow's own ``@workflow(deadline=...)`` (None: no deadline)."""
        if self.run_options.deadline is not None:
            return self.run_options.deadline
        return self._deadline

    def queue_tag(self, run_id: str, key: str | None = None) -> str:
        """The tag of the queue partition a new run `run_id` (of `key`) of this workflow goes to."""
        queue = self.run_options.queue or self.queue
        return queue.tag_for(key if key is not None else self.run_options.key, run_id)

    def options(
        self,
        *,
        run_id: str | None = None,
        redis_url: str | None = None,
        settings: Settings | None = None,
        queue: Queue | str | None = None,
        key: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | str | None = None,
        at: datetime | float | None = None,
        dedup: str | None = None,
        deadline: float | timedelta | str | None = None,
    ) -> Workflow[P, R]:
        """This workflow with run options, for `start()`, `enqueue()` and friends.

        Args:
            run_id: The run's ID (default: derived from the workflow ID and the
                encoded arguments, so the same call reaches the same run).
            redis_url: Shorthand for ``settings=Settings.from_env(redis_url=...)``.
            settings: Where the log lives (default: `Settings.from_env()`).
            queue: The queue this run goes to, instead of the workflow's.
            key: The run's flow-control key (a customer, a tenant): the queue's
                `per_key` and `key_rate` limits count runs per key, and keys
                take turns. `enqueue` only, like the options below.
            priority: 0 (first) to 9 (last), default 5, on a queue declared
                with ``priority=True``.
            delay: Start no sooner than this (seconds, a `timedelta`, ``"10m"``).
            at: Start no sooner than this moment (an aware `datetime` or Unix time).
            dedup: A deduplication ID: while a run enqueued with it has not
                ended, enqueueing another with it returns that run's ID.
            deadline: How long a new run may take from its creation (seconds, a
                `timedelta`, ``"30m"``), instead of the workflow's own deadline;
                past it the run is cancelled (`RunTimeoutError`). Stored with the
                run when it is created: a run that exists keeps its own.
        """
        if run_id is not None:
            check_run_id(run_id)
        if redis_url is not None:
            settings = Settings.from_env(redis_url=redis_url)
        old = self.run_options
        merged = RunOptions(
            run_id if run_id is not None else old.run_id,
            settings if settings is not None else old.settings,
        )
        merged.queue = queue_named(queue) if queue is not None else old.queue
        merged.key = _text_option(key, "key") if key is not None else old.key
        merged.dedup = _text_option(dedup, "dedup ID") if dedup is not None else old.dedup
        if priority is not None:
            if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
                raise ConfigurationError(
                    f"invalid priority {priority!r}: use a whole number from 0 (first) to {MAX_PRIORITY}"
                )
        merged.priority = priority if priority is not None else old.priority
        merged.delay = parse_duration(delay, what="delay") if delay is not None else old.delay
        merged.at = _when(at) if at is not None else old.at
        merged.deadline = check_deadline(deadline, self.id) if deadline is not None else old.deadline
        if merged.delay is not None and merged.at is not None:
            raise ConfigurationError("give a run either delay= or at=, not both")
        bound = Workflow.__new__(Workflow)
        bound.__dict__.update(self.__dict__)
        bound.run_options = merged
        return bound

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        run = current_run()
        if run is not None:
            queued = self.run_options.queued()
            if queued:
                # A child executes in its parent's process at once, as start() does: no queue to wait in.
                raise ConfigurationError(
                    f"{', '.join(queued)}: options of enqueue(), where a run waits in its queue; a child run "
                    f"of {self.id!r} executes in its parent's process at once (enqueue it from a step to have "
                    f"its queue's limits apply)"
                )
            seq = run.next_seq()
            child_id = self.run_options.run_id or child_run_id(run.run_id, seq)
            return run.runner.run_child(self, seq, child_id, args, kwargs)
        if current_step() is not None:
            raise NotInWorkflowError(
                f"workflow {self.id!r} was called inside a step; call it from the workflow body "
                f"(a child run) or start it from outside the run"
            )
        return self._plain(*args, **kwargs)

    def _signature(self) -> tuple[list[inspect.Parameter], dict[str, Any]]:
        """The body's parameters and type hints, looked up once: a worker decodes calls per run."""
        cached: tuple[list[inspect.Parameter], dict[str, Any]] | None = self.__dict__.get("_sig")
        if cached is None:
            cached = self.__dict__["_sig"] = (list(inspect.signature(self.fn).parameters.values()), _hints(self.fn))
        return cached

    def decode_call(self, raw: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A recorded ``[args, kwargs]`` decoded to the workflow's parameter types.

        Raises:
            SerializationError: naming the argument that does not decode.
        """
        try:
            args_raw, kwargs_raw = msgspec.msgpack.decode(raw, type=tuple[list[msgspec.Raw], dict[str, msgspec.Raw]])
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            raise SerializationError(
                f"{self.id}: the recorded arguments do not decode: {exc}", step_id=self.id, where="arguments"
            ) from None
        params, hints = self._signature()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        star = next((p for p in params if p.kind == p.VAR_POSITIONAL), None)
        double = next((p for p in params if p.kind == p.VAR_KEYWORD), None)
        args = []
        for i, value in enumerate(args_raw):
            param = positional[i] if i < len(positional) else star
            kind = hints.get(param.name, Any) if param is not None else Any
            args.append(decode_value(bytes(value), kind, owner=self.id, where=f"argument {i}"))
        kwargs = {}
        by_name = {p.name: p for p in params}
        for name, value in kwargs_raw.items():
            param = by_name.get(name, double)
            kind = hints.get(param.name, Any) if param is not None else Any
            kwargs[name] = decode_value(bytes(value), kind, owner=self.id, where=f"argument {name!r}")
        return tuple(args), kwargs

    async def _plain(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<werkfluss workflow {self.id}>"


@overload
def step(fn: Callable[P, Awaitable[R]], /) -> Step[P, R]: ...
@overload
def step(
    *, name: str | None = None, retries: int | RetryPolicy = 0, timeout: float | None = None, check_args: bool = True
) -> Callable[[Callable[P, Awaitable[R]]], Step[P, R]]: ...
def step(
    fn: Callable[P, Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int | RetryPolicy = 0,
    timeout: float | None = None,
    check_args: bool = True,
) -> Step[P, R] | Callable[[Callable[P, Awaitable[R]]], Step[P, R]]:
    """Make an async function a durable step.

    Args:
        fn: The async function (when used bare: ``@step`` or ``step(fn)``).
        name: The step ID (default ``module:qualname``).
        retries: Retries after the first attempt, or a `RetryPolicy`.
        timeout: Seconds per attempt; a slower attempt is cancelled and fails.
        check_args: A replay raises `NonDeterminismError` when the step is
            called with other arguments than recorded. Turn it off for a step
            that legitimately takes a changing value (a timestamp for a log
            line, say); its recorded result is then replayed whatever it is passed.
    """
    options = step_options(retries, timeout, check_args)
    if fn is not None:
        return Step(fn, name=name, options=options)

    def decorate(f: Callable[P, Awaitable[R]]) -> Step[P, R]:
        return Step(f, name=name, options=options)

    return decorate


@overload
def workflow(fn: Callable[P, Awaitable[R]], /) -> Workflow[P, R]: ...
@overload
def workflow(
    *, name: str | None = None, queue: Queue | str | None = None, deadline: float | timedelta | str | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Workflow[P, R]]: ...
def workflow(
    fn: Callable[P, Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    queue: Queue | str | None = None,
    deadline: float | timedelta | str | None = None,
) -> Workflow[P, R] | Callable[[Callable[P, Awaitable[R]]], Workflow[P, R]]:
    """Make an async function a durable workflow.

    Args:
        fn: The async function (when used bare: ``@workflow`` or ``workflow(fn)``).
        name: The workflow ID (default ``module:qualname``).
        queue: The `Queue` (or a declared queue's name) its enqueued runs wait
            in (default: the ``"default"`` queue, with no limits).
        deadline: How long each run may take from its creation (`start` or
            `enqueue`): seconds, a `timedelta` or text like ``"2h"`` (default:
            no deadline). Past it the run is cancelled, its running step and
            its child runs with it, and its callers get `RunTimeoutError`.
            ``options(deadline=...)`` sets one per run.
    """
    if fn is not None:
        return Workflow(fn, name=name, queue=queue, deadline=deadline)

    def decorate(f: Callable[P, Awaitable[R]]) -> Workflow[P, R]:
        return Workflow(f, name=name, queue=queue, deadline=deadline)

    return decorate
