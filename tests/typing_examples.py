"""Static typing of the public API: checked by ``mypy --strict tests/typing_examples.py``, never run.

`step` and `workflow` keep the wrapped signature (ParamSpec) and return type,
so `start()` is typed by the workflow it starts. Each ``# type: ignore[...]``
below marks a call that must be a type error: under ``--strict``,
``warn_unused_ignores`` turns an ignore that is no longer needed into an
error, so these lines fail the check if the error disappears.

Not collected by pytest: the name does not match ``test_*.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar, assert_type

from werkfluss import RetryPolicy, Settings, Step, Workflow, start, start_async, step, step_key, workflow


@dataclass
class Receipt:
    order: str
    cents: int


# Positional-only parameters make the ParamSpec exactly ``[str, int]`` for assert_type;
# functions with named parameters (fetch, fulfil) are checked through calls and typed parameters.


@step
async def fetch(url: str, *, retries: int = 0) -> bytes:
    return url.encode()


@step(retries=3, timeout=10.0)
async def charge(order: str, cents: int, /) -> Receipt:
    return Receipt(order, cents)


@step(retries=RetryPolicy(retries=2, backoff="linear"), name="shop.ship")
async def ship(order: str, /) -> None:
    pass


async def _plain_double(x: int, /) -> int:
    return 2 * x


double = step(_plain_double)


@workflow
async def greet(name: str, /) -> str:
    await fetch("https://example.org")
    return f"hello {name}"


@workflow(name="shop.fulfil")
async def fulfil(order: str, cents: int = 100) -> Receipt:
    receipt = await charge(order, cents)
    await ship(order)
    return receipt


@workflow(deadline="2h")
async def onboarding(user_id: str, /) -> None:
    await ship(user_id)


plain_workflow = workflow(_plain_double)

P = ParamSpec("P")
R = TypeVar("R")


def check_wrappers() -> None:
    assert_type(charge, Step[[str, int], Receipt])
    assert_type(ship, Step[[str], None])
    assert_type(double, Step[[int], int])
    assert_type(greet, Workflow[[str], str])
    assert_type(plain_workflow, Workflow[[int], int])

    takes_fulfil(fulfil)  # named parameters may be passed positionally
    takes_fulfil(fulfil.options(run_id="a"))
    takes_greet(fulfil)  # type: ignore[arg-type]
    takes_fulfil(greet)  # type: ignore[arg-type]
    takes_charge(charge)
    takes_charge(ship)  # type: ignore[arg-type]
    takes_charge(greet)  # type: ignore[arg-type]


def takes_fulfil(wf: Workflow[[str, int], Receipt]) -> None:
    pass


def takes_greet(wf: Workflow[[str], str]) -> None:
    pass


def takes_charge(s: Step[[str, int], Receipt]) -> None:
    pass


async def check_steps_and_workflows_keep_their_calls() -> None:
    call = assert_type(fetch("u"), Coroutine[Any, Any, bytes])
    call.close()
    assert_type(await fetch("u", retries=2), bytes)
    assert_type(await charge("o", 5), Receipt)
    assert_type(await ship("o"), None)
    assert_type(await double(2), int)
    assert_type(await greet("ada"), str)
    assert_type(step_key(), str)

    await fetch(b"u")  # type: ignore[arg-type]
    await fetch("u", 2)  # type: ignore[call-arg]
    await fetch("u", retry=2)  # type: ignore[call-arg]
    await charge("o")  # type: ignore[call-arg]
    await charge("o", "5")  # type: ignore[arg-type]
    await double("2")  # type: ignore[arg-type]
    await double(x=2)  # type: ignore[call-arg]
    await greet()  # type: ignore[call-arg]


def check_start() -> None:
    assert_type(start(greet, "ada"), str)
    assert_type(start(fulfil, "o-1"), Receipt)
    assert_type(start(fulfil, "o-1", cents=5), Receipt)
    assert_type(start(plain_workflow, 3), int)
    assert_type(start(greet.options(run_id="a"), "ada"), str)

    start(greet, 42)  # type: ignore[arg-type]
    start(greet)  # type: ignore[call-arg]
    start(greet, "a", "b")  # type: ignore[call-arg]
    start(fulfil, "o", cents="5")  # type: ignore[arg-type]
    start(fulfil, "o", tip=1)  # type: ignore[call-arg]
    start(charge, "o", 5)  # type: ignore[arg-type]
    start(_plain_double, 1)  # type: ignore[arg-type]


async def check_start_async() -> None:
    call = assert_type(start_async(greet, "ada"), Coroutine[Any, Any, str])
    call.close()
    assert_type(await start_async(greet, "ada"), str)
    assert_type(await start_async(fulfil, "o", 5), Receipt)
    pending: Awaitable[str] = start_async(greet, "ada")
    assert_type(await pending, str)

    await start_async(greet, 1)  # type: ignore[arg-type]
    await start_async(fulfil)  # type: ignore[call-arg]


def check_options() -> None:
    bound = greet.options(run_id="a")
    assert_type(bound, Workflow[[str], str])
    assert_type(greet.options(run_id="a", settings=Settings(prefix="p:")), Workflow[[str], str])
    assert_type(plain_workflow.options(redis_url="redis://localhost").options(run_id="b"), Workflow[[int], int])
    assert_type(start(fulfil.options(run_id="c"), "o", cents=1), Receipt)

    greet.options("a")  # type: ignore[call-arg]
    greet.options(run_id=1)  # type: ignore[arg-type]
    greet.options(settings="redis://x")  # type: ignore[arg-type]
    assert_type(onboarding.options(deadline="30m"), Workflow[[str], None])
    assert_type(greet.options(deadline=timedelta(hours=1)).deadline, float | None)
    greet.options(deadline=[1])  # type: ignore[arg-type]
    workflow(deadline=object())  # type: ignore[call-overload]


def check_decoration_is_checked() -> None:
    def sync(x: int) -> int:
        return x

    step(sync)  # type: ignore[arg-type]
    workflow(sync)  # type: ignore[arg-type]
    step(retries="3")  # type: ignore[call-overload]
    step(timeout="1s")  # type: ignore[call-overload]
    workflow(retries=3)  # type: ignore[call-overload]
    Settings(fsync="never")  # type: ignore[arg-type]
    RetryPolicy(backoff="random")  # type: ignore[arg-type]

    decorate: Callable[[Callable[[int], Awaitable[int]]], Step[[int], int]] = step(retries=1)
    assert_type(decorate(_plain_double), Step[[int], int])


def options_keep_the_exact_signature(wf: Workflow[P, R]) -> Workflow[P, R]:
    """Generic in P and R: this body type-checks only if options() returns the same Workflow[P, R]."""
    return wf.options(run_id="a").options(settings=Settings())


def step_keeps_the_exact_signature(fn: Callable[P, Awaitable[R]]) -> Step[P, R]:
    """Both forms of step() give Step[P, R] for any wrapped signature."""
    assert_type(step(fn), Step[P, R])
    return step(retries=2)(fn)


def workflow_keeps_the_exact_signature(fn: Callable[P, Awaitable[R]]) -> Workflow[P, R]:
    assert_type(workflow(fn), Workflow[P, R])
    return workflow(name="x")(fn)
