"""`step()` and `workflow()` (`werkfluss._wrappers`) without a server: wrapping, plain calls, options."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import uuid
from typing import TYPE_CHECKING, Any, cast

import pytest

from werkfluss import (
    ConfigurationError,
    NotInWorkflowError,
    RetryPolicy,
    Settings,
    Step,
    Workflow,
    step,
    step_key,
    workflow,
)
from werkfluss._context import RunContext, StepContext, enter_run, enter_step, exit_run, exit_step

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from werkfluss._context import Runner


@dataclasses.dataclass
class Receipt:
    order: str
    cents: int


async def _add(a: int, b: int = 1) -> int:
    """Add two numbers."""
    return a + b


add = step(_add)


@step
async def double(x: int) -> int:
    """Double it."""
    return 2 * x


@step(retries=3, timeout=2.5)
async def charge(order: str, cents: int) -> Receipt:
    """Charge an order."""
    return Receipt(order, cents)


@step(retries=RetryPolicy(retries=2, backoff="constant"))
async def ship(order: str) -> str:
    return f"shipped {order}"


@workflow
async def fulfil(order: str) -> Receipt:
    """Fulfil an order."""
    receipt = await charge(order, 1250)
    await ship(order)
    return receipt


@workflow(name="shop.nightly")
async def nightly() -> list[int]:
    return [await double(1), await add(2)]


@step
async def outer_step(x: int) -> int:
    return await double(x) + 1


@step
async def key_step() -> str:
    return step_key()


@workflow
async def calls_a_workflow() -> Receipt:
    return await fulfil("nested")


def unique(label: str) -> str:
    return f"test-wrappers-{label}-{uuid.uuid4().hex[:8]}"


class FakeExecutor:
    """Stands in for the runtime: records what a step call inside a run hands over."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, tuple[Any, ...], dict[str, Any]]] = []

    async def run_step(self, step_: Step[Any, Any], seq: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        self.calls.append((step_.id, seq, args, kwargs))
        return f"recorded #{seq}"

    async def run_child(
        self, wf: Workflow[Any, Any], seq: int, child_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str:
        self.calls.append((f"{wf.id} as {child_id}", seq, args, kwargs))
        return f"child #{seq}"


@pytest.fixture
def in_run() -> Iterator[FakeExecutor]:
    executor = FakeExecutor()
    token = enter_run(RunContext("run-1", cast("Runner", executor)))
    yield executor
    exit_run(token)


@pytest.fixture
def in_step() -> Iterator[StepContext]:
    ctx = StepContext("run-1", "mod:some_step", 7, 2)
    token = enter_step(ctx)
    yield ctx
    exit_step(token)


# --- wrapping ------------------------------------------------------------------------------------------------------


def test_bare_decorator_with_options_and_plain_wrapper_make_steps() -> None:
    for s in (add, double, charge, ship):
        assert isinstance(s, Step)
    assert add.fn is _add
    assert double.id == f"{__name__}:double"
    assert add.id == f"{__name__}:_add"


def test_step_options_are_kept() -> None:
    assert double.options.retry == RetryPolicy()
    assert double.options.timeout is None
    assert charge.options.retry == RetryPolicy(retries=3)
    assert charge.options.timeout == 2.5
    assert ship.options.retry == RetryPolicy(retries=2, backoff="constant")


def test_workflow_forms() -> None:
    assert isinstance(fulfil, Workflow)
    assert isinstance(nightly, Workflow)
    assert fulfil.id == f"{__name__}:fulfil"
    assert nightly.id == "shop.nightly"
    plain = workflow(name=unique("plain"))(_add)
    assert isinstance(plain, Workflow)
    assert plain.fn is _add


def test_step_name_overrides_the_id() -> None:
    name = unique("named")

    @step(name=name)
    async def anything() -> None:
        pass

    assert anything.id == name


@pytest.mark.parametrize("bad_option", [{"retries": -1}, {"timeout": 0}, {"timeout": -5.0}])
def test_bad_step_options_fail_at_decoration(bad_option: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        step(**bad_option)


def test_bad_name_fails_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="invalid name"):
        step(name="a{b}")(_add)
    with pytest.raises(ConfigurationError, match="invalid name"):
        workflow(name="")(_add)


def _sync(x: int) -> int:
    return x


class NotAFunction:
    pass


class AsyncCallable:
    async def __call__(self) -> None:
        pass


async def _agen() -> Any:
    yield 1


@pytest.mark.parametrize(
    "fn",
    [_sync, lambda: None, NotAFunction, AsyncCallable(), _agen, print, 42],
    ids=["def", "lambda", "class", "async-callable-object", "async-generator", "builtin", "int"],
)
@pytest.mark.parametrize("wrap", [step, workflow], ids=["step", "workflow"])
def test_non_async_callables_are_rejected(fn: Any, wrap: Any) -> None:
    with pytest.raises(ConfigurationError, match="async") as info:
        wrap(fn)
    assert f"{wrap.__name__}()" in str(info.value)


def test_rejection_suggests_a_wrapper() -> None:
    with pytest.raises(ConfigurationError, match=r"'async def _sync\(...\)") as info:
        step(_sync)  # type: ignore[arg-type]
    assert "_sync is not 'async def'" in str(info.value)


def test_decorator_with_options_rejects_non_async_too() -> None:
    with pytest.raises(ConfigurationError, match="async"):
        step(retries=2)(_sync)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="async"):
        workflow(name=unique("sync"))(_sync)  # type: ignore[arg-type]


def meta(obj: object, attr: str) -> object:
    """Metadata functools.update_wrapper sets at runtime (Step and Workflow do not declare it for mypy)."""
    return getattr(obj, attr)


def test_metadata_is_copied() -> None:
    assert meta(double, "__name__") == "double"
    assert double.__doc__ == "Double it."
    assert meta(double, "__qualname__") == "double"
    assert double.__module__ == __name__
    assert meta(double, "__wrapped__") is double.fn
    assert meta(add, "__name__") == "_add"
    assert add.__doc__ == "Add two numbers."
    assert meta(fulfil, "__name__") == "fulfil"
    assert fulfil.__doc__ == "Fulfil an order."
    assert meta(fulfil, "__wrapped__") is fulfil.fn


def test_attributes_of_the_wrapped_function_do_not_override_the_wrappers_own() -> None:
    async def tagged() -> None:
        pass

    tagged.id = "some framework's id"  # type: ignore[attr-defined]
    tagged.options = {"framework": "metadata"}  # type: ignore[attr-defined]
    name = unique("tagged")
    tagged_step = step(name=name)(tagged)
    assert tagged_step.id == name
    assert isinstance(tagged_step.options.retry, RetryPolicy)

    def logged(fn: Callable[[int], Awaitable[int]]) -> Callable[[int], Awaitable[int]]:
        @functools.wraps(fn)
        async def wrapper(x: int) -> int:
            return await fn(x) + 100

        return wrapper

    name = unique("logged")
    logged_double = workflow(name=name)(logged(double))
    assert logged_double.id == name
    assert logged_double.fn is not double.fn


def test_signature_is_visible_through_the_wrapper() -> None:
    assert str(inspect.signature(add)) == "(a: 'int', b: 'int' = 1) -> 'int'"
    assert list(inspect.signature(fulfil).parameters) == ["order"]


def test_repr() -> None:
    assert repr(double) == f"<werkfluss step {__name__}:double>"
    assert repr(nightly) == "<werkfluss workflow shop.nightly>"


# --- calls outside a run -------------------------------------------------------------------------------------------


async def test_step_outside_a_workflow_runs_as_a_plain_coroutine() -> None:
    call = charge("o-1", 99)
    assert inspect.iscoroutine(call)
    assert await call == Receipt("o-1", 99)
    assert await add(2) == 3
    assert await add(2, b=5) == 7


async def test_workflow_called_directly_runs_as_a_plain_coroutine() -> None:
    call = fulfil("o-2")
    assert inspect.iscoroutine(call)
    assert await call == Receipt("o-2", 1250)
    assert await nightly() == [2, 3]


async def test_errors_propagate_from_plain_calls() -> None:
    @step
    async def boom() -> None:
        raise KeyError("plain")

    with pytest.raises(KeyError, match="plain"):
        await boom()


async def test_step_key_outside_a_step_raises() -> None:
    with pytest.raises(NotInWorkflowError, match="step_key"):
        step_key()
    with pytest.raises(NotInWorkflowError):
        await key_step()  # a plain step call is not a step in a workflow


def test_step_key_inside_a_step(in_step: StepContext) -> None:
    assert step_key() == "run-1:7"
    assert in_step.key == "run-1:7"


async def test_step_inside_another_step_runs_plain(in_step: StepContext) -> None:
    assert await outer_step(5) == 11
    assert await double(4) == 8


async def test_step_inside_a_step_inside_a_run_runs_plain(in_run: FakeExecutor, in_step: StepContext) -> None:
    assert await outer_step(5) == 11
    assert in_run.calls == []


# --- calls inside a run --------------------------------------------------------------------------------------------


async def test_step_inside_a_run_goes_to_the_executor_numbered_at_call_time(in_run: FakeExecutor) -> None:
    first = double(1)
    second = charge("o", cents=5)
    third = double(3)
    assert [c[:2] for c in in_run.calls] == []  # nothing has run yet ...
    results: list[Any] = [await third, await first, await second]  # ... but the numbers were taken in call order
    assert results == ["recorded #3", "recorded #1", "recorded #2"]
    assert in_run.calls == [
        (double.id, 3, (3,), {}),
        (double.id, 1, (1,), {}),
        (charge.id, 2, ("o",), {"cents": 5}),
    ]


async def test_workflow_inside_a_run_is_a_child_run_with_a_derived_id(in_run: FakeExecutor) -> None:
    first = fulfil("o")
    second = fulfil.options(run_id="chosen")("p")
    assert await first == "child #1"  # type: ignore[comparison-overlap]  # the fake executor returns text
    assert await second == "child #2"  # type: ignore[comparison-overlap]
    assert in_run.calls == [(f"{fulfil.id} as run-1/1", 1, ("o",), {}), (f"{fulfil.id} as chosen", 2, ("p",), {})]


def test_workflow_inside_a_step_is_refused(in_step: StepContext) -> None:
    with pytest.raises(NotInWorkflowError, match=f"workflow {fulfil.id!r}"):
        fulfil("o")  # type: ignore[unused-coroutine]


# --- Workflow.options ----------------------------------------------------------------------------------------------


def test_options_returns_a_new_workflow_with_the_run_id() -> None:
    bound = fulfil.options(run_id="order-7")
    assert bound is not fulfil
    assert isinstance(bound, Workflow)
    assert bound.run_options.run_id == "order-7"
    assert bound.id == fulfil.id
    assert bound.fn is fulfil.fn
    assert meta(bound, "__name__") == "fulfil"
    assert fulfil.run_options.run_id is None
    assert fulfil.run_options.settings is None


@pytest.mark.parametrize("bad", ["", "a b", "{x}", "x" * 201])
def test_options_validates_the_run_id(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid run_id"):
        fulfil.options(run_id=bad)
    assert fulfil.run_options.run_id is None


def test_options_do_not_register_the_id_again(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[str] = []
    monkeypatch.setattr("werkfluss._wrappers.register", lambda ident, *_: registered.append(ident))
    fulfil.options(run_id="a").options(settings=Settings(prefix="x:"))
    assert registered == []
    workflow(name=unique("spy"))(_add)  # the spy sees a real registration
    assert len(registered) == 1


def test_options_chain_and_merge() -> None:
    settings = Settings(prefix="chain:")
    bound = fulfil.options(run_id="a").options(settings=settings)
    assert bound.run_options.run_id == "a"
    assert bound.run_options.settings is settings
    rebound = bound.options(run_id="b")
    assert rebound.run_options.run_id == "b"
    assert rebound.run_options.settings is settings
    assert bound.run_options.run_id == "a"


def test_options_redis_url_builds_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WERKFLUSS_PREFIX", "envp:")
    monkeypatch.delenv("WERKFLUSS_REDIS_URL", raising=False)
    bound = fulfil.options(redis_url="redis://cache:6379/3")
    assert bound.run_options.settings is not None
    assert bound.run_options.settings.redis_url == "redis://cache:6379/3"
    assert bound.run_options.settings.prefix == "envp:"


async def test_bound_workflow_still_runs_plain() -> None:
    assert await fulfil.options(run_id="plain-1")("o-3") == Receipt("o-3", 1250)


# --- return_type ---------------------------------------------------------------------------------------------------


def test_return_type_resolves_annotations() -> None:
    assert charge.return_type() is Receipt
    assert double.return_type() is int
    assert fulfil.return_type() is Receipt
    assert nightly.return_type() == list[int]
    assert fulfil.options(run_id="x").return_type() is Receipt


def test_return_type_without_annotation_is_any() -> None:
    @step
    async def untyped():  # type: ignore[no-untyped-def]
        return 1

    assert untyped.return_type() is Any


def test_return_type_of_none() -> None:
    @step
    async def nothing() -> None:
        pass

    assert nothing.return_type() is type(None)


def test_unresolvable_forward_reference_falls_back_to_any() -> None:
    @dataclasses.dataclass
    class Local:
        x: int

    @step
    async def local() -> Local:
        return Local(1)

    @workflow
    async def missing() -> DoesNotExist:  # type: ignore[name-defined]  # noqa: F821
        return None

    assert local.return_type() is Any  # 'Local' is not in the module's globals
    assert missing.return_type() is Any


def test_return_type_is_resolved_once(monkeypatch: pytest.MonkeyPatch) -> None:
    @step
    async def once() -> int:
        return 1

    calls: list[object] = []

    def counting(fn: object) -> Any:
        calls.append(fn)
        return int

    monkeypatch.setattr("werkfluss._wrappers._return_type", counting)
    assert once.return_type() is int
    assert once.return_type() is int
    assert len(calls) == 1
