"""Issue 12's regressions: what users write gets the same answer live and on replay.

Arguments reach the body as given (a dict's key order too, in every process);
a replay that calls a step with other arguments is a `NonDeterminismError`;
a step's or a workflow's value is the one a replay decodes, and a value that
does not match its annotation fails the same way live and on every rerun; a
timed-out step whose body swallows the cancellation is a failed attempt; a
hook that lost a race hands its payload to a later ``await`` after a replay.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from collections import Counter
from typing import Any

import anyio
import pytest

from werkfluss import (
    NonDeterminismError,
    SerializationError,
    Settings,
    StepFailedError,
    Worker,
    get_run_async,
    hook,
    invoke_hook_async,
    race,
    resume_async,
    sleep,
    start_async,
    step,
    workflow,
)
from werkfluss._events import RaceWon, RunStarted, StepCompleted, StepFailed
from werkfluss.testing import check_replay_async

from .helpers import events, until_status

calls: Counter[str] = Counter()
flags: dict[str, Any] = {}
RESET = (calls, flags)  # What conftest's `wf` clears before each test.


# -- 1. arguments as given ----------------------------------------------------------------------------------------


@step(name="lr.price")
async def price(fruit: str) -> str:
    calls[fruit] += 1
    if fruit == "apple" and flags.get("fail_apple"):
        raise RuntimeError("boom")
    return f"price-of-{fruit}"


@workflow(name="lr.prices")
async def prices(basket: dict[str, int]) -> list[str]:
    return [await price(k) for k in basket]


@workflow(name="lr.prices_kw")
async def prices_kw(*, basket: dict[str, int], extra: tuple[str, ...] = ()) -> list[str]:
    return [await price(k) for k in [*basket, *extra]]


async def test_a_worker_resumes_a_dict_argument_in_the_callers_order(wf: Settings) -> None:
    # The reproduction: pear ran, apple failed; the worker decodes the run's
    # arguments from the log. A key-sorted encoding walked apple, pear and handed
    # apple the result recorded for pear.
    flags["fail_apple"] = True
    with pytest.raises(StepFailedError, match="boom"):
        await start_async(prices.options(settings=wf, run_id="b1"), {"pear": 1, "apple": 2})
    flags["fail_apple"] = False
    await resume_async("b1", settings=wf)
    async with Worker(settings=wf, poll=0.02):
        await until_status(wf, "b1", "completed")
    info = await get_run_async("b1", settings=wf)
    assert info.result == ["price-of-pear", "price-of-apple"]
    assert info.args == [{"pear": 1, "apple": 2}]
    assert list(info.args[0]) == ["pear", "apple"]
    assert calls == {"pear": 1, "apple": 2}


async def test_keyword_arguments_and_child_runs_keep_the_callers_order(wf: Settings) -> None:
    @workflow
    async def parent(basket: dict[str, int]) -> list[str]:
        return await prices_kw(basket=basket, extra=("fig",))

    flags["fail_apple"] = True
    with pytest.raises(StepFailedError):
        await start_async(parent.options(settings=wf, run_id="kp"), {"zucchini": 1, "apple": 2})
    flags["fail_apple"] = False
    await resume_async("kp", settings=wf)
    async with Worker(settings=wf, poll=0.02):
        await until_status(wf, "kp", "completed")
    assert (await get_run_async("kp", settings=wf)).result == ["price-of-zucchini", "price-of-apple", "price-of-fig"]
    assert (await get_run_async("kp/1", settings=wf)).kwargs == {
        "basket": {"zucchini": 1, "apple": 2},
        "extra": ["fig"],
    }
    assert calls == {"zucchini": 1, "apple": 2, "fig": 1}
    started = [e for e in await events(wf, "kp/1") if isinstance(e, RunStarted)]
    assert started and started[0].parent == "kp"


async def test_equal_dicts_in_another_order_reach_the_same_run(wf: Settings) -> None:
    # Run IDs and the argument check derive from a canonical form: equal arguments are one call.
    first = await start_async(prices.options(settings=wf), {"pear": 1, "apple": 2})
    again = await start_async(prices.options(settings=wf), {"apple": 2, "pear": 1})
    assert first == again == ["price-of-pear", "price-of-apple"]
    assert calls == {"pear": 1, "apple": 1}


# -- 2. step arguments are checked on replay ----------------------------------------------------------------------


@step(name="lr.greet")
async def greet(name: str, options: dict[str, Any]) -> str:
    calls["greet"] += 1
    return f"hello {name}"


@step(name="lr.flaky_end")
async def flaky_end() -> str:
    calls["flaky_end"] += 1
    if calls["flaky_end"] == 1:
        raise RuntimeError("interrupt once")
    return "end"


@step(name="lr.stamp", check_args=False)
async def stamp(at: float) -> str:
    calls["stamp"] += 1
    return "stamped"


async def test_a_step_called_with_other_arguments_on_replay_is_a_divergence(wf: Settings) -> None:
    @workflow
    async def welcome(name: str) -> str:
        greeting = await greet(name, {"fruit": flags["fruit"], "n": 1})
        return greeting + await flaky_end()

    flags["fruit"] = "pear"
    with pytest.raises(StepFailedError, match="interrupt once"):
        await start_async(welcome.options(settings=wf, run_id="d1"), "ann")
    flags["fruit"] = "apple"
    with pytest.raises(NonDeterminismError) as info:
        await start_async(welcome.options(settings=wf, run_id="d1"), "ann")
    message = str(info.value)
    assert "'d1'" in message and "#1" in message and "lr.greet" in message
    assert "argument 1['fruit']: recorded 'pear', now 'apple'" in message
    assert "check_args=False" in message
    assert info.value.seq == 1 and info.value.arguments is not None
    assert calls["greet"] == 1 and calls["flaky_end"] == 1  # nothing past the divergence ran
    assert (await get_run_async("d1", settings=wf)).status == "blocked"
    # Fixed code (the recorded argument again) resumes the blocked run.
    flags["fruit"] = "pear"
    assert await start_async(welcome.options(settings=wf, run_id="d1"), "ann") == "hello annend"
    assert calls["greet"] == 1


async def test_a_replay_check_reports_other_arguments(wf: Settings) -> None:
    @workflow
    async def checked(name: str) -> str:
        return await greet(name, {"fruit": flags["fruit"]}) + await flaky_end()

    flags["fruit"] = "pear"
    with pytest.raises(StepFailedError):
        await start_async(checked.options(settings=wf, run_id="d0"), "ann")
    assert (await check_replay_async(checked, "d0", settings=wf)).ok
    flags["fruit"] = "fig"
    result = await check_replay_async(checked, "d0", settings=wf)
    assert result.divergence is not None and result.divergence.seq == 1
    assert "argument 1['fruit']: recorded 'pear', now 'fig'" in result.divergence.message
    assert calls["greet"] == 1  # a check executes nothing


async def test_the_same_arguments_in_another_dict_order_replay(wf: Settings) -> None:
    @workflow
    async def ordered() -> str:
        options = {"a": 1, "b": 2} if calls["flaky_end"] == 0 else {"b": 2, "a": 1}
        return await greet("x", options) + await flaky_end()

    with pytest.raises(StepFailedError):
        await start_async(ordered.options(settings=wf, run_id="d2"))
    assert await start_async(ordered.options(settings=wf, run_id="d2")) == "hello xend"
    assert calls["greet"] == 1


async def test_check_args_false_replays_a_changing_argument(wf: Settings) -> None:
    @workflow
    async def stamped() -> str:
        return await stamp(anyio.current_time()) + await flaky_end()

    with pytest.raises(StepFailedError):
        await start_async(stamped.options(settings=wf, run_id="d3"))
    assert await start_async(stamped.options(settings=wf, run_id="d3")) == "stampedend"
    assert calls["stamp"] == 1
    completed = [e for e in await events(wf, "d3") if isinstance(e, StepCompleted) and e.step == "lr.stamp"]
    assert completed[0].digest is None


async def test_a_replayed_failure_checks_its_arguments_too(wf: Settings) -> None:
    @step
    async def refuse(n: int) -> None:
        raise ValueError(f"no {n}")

    @workflow
    async def tolerant() -> str:
        try:
            await refuse(flags["n"])
        except StepFailedError:
            pass
        return await flaky_end()

    flags["n"] = 1
    with pytest.raises(StepFailedError, match="interrupt once"):
        await start_async(tolerant.options(settings=wf, run_id="d4"))
    flags["n"] = 2
    with pytest.raises(NonDeterminismError, match="other arguments"):
        await start_async(tolerant.options(settings=wf, run_id="d4"))


async def test_a_child_called_with_other_arguments_on_replay_is_a_divergence(wf: Settings) -> None:
    @workflow
    async def child(n: int) -> int:
        return n * 2

    @workflow
    async def parent() -> str:
        await child(flags["n"])
        return await flaky_end()

    flags["n"] = 1
    with pytest.raises(StepFailedError):
        await start_async(parent.options(settings=wf, run_id="d5"))
    flags["n"] = 2
    with pytest.raises(NonDeterminismError, match=r"argument 0: recorded 1, now 2"):
        await start_async(parent.options(settings=wf, run_id="d5"))


# -- 3. a step's value is the same live and on replay -------------------------------------------------------------


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_a_step_gets_its_result_as_a_replay_decodes_it(wf: Settings) -> None:
    seen: list[Any] = []

    @step
    async def as_tuple() -> list[int]:
        return (1, 2)  # type: ignore[return-value]  # what users write by accident

    @step
    async def untyped():  # type: ignore[no-untyped-def]
        return Point(1, 2)

    @workflow
    async def collect() -> list[Any]:
        values = [await as_tuple(), await untyped()]
        seen.append(values)
        await flaky_end()
        return values

    with pytest.raises(StepFailedError):
        await start_async(collect.options(settings=wf, run_id="v1"))
    result = await start_async(collect.options(settings=wf, run_id="v1"))
    live, replayed = seen
    assert live == replayed == [[1, 2], {"x": 1, "y": 2}]
    assert [type(v) for v in live] == [type(v) for v in replayed] == [list, dict]
    assert result == live


async def test_a_result_that_does_not_match_its_annotation_fails_the_same_way_every_time(wf: Settings) -> None:
    # The Tour's snippet: a body that returns None for `-> str`.
    @step
    async def fetch(user_id: str) -> str:
        calls["fetch"] += 1
        return None  # type: ignore[return-value]

    @workflow
    async def onboard(user_id: str) -> str:
        return await fetch(user_id)

    errors = []
    for _ in range(3):
        with pytest.raises(StepFailedError) as info:
            await start_async(onboard.options(settings=wf, run_id="v2"), "user-123")
        errors.append(info.value)
    assert all(e.error_type == "werkfluss.SerializationError" for e in errors)
    assert "does not match its annotation" in errors[0].error_message and "None" in errors[0].error_message
    assert "Did the annotated type change" not in str(errors[0])
    assert isinstance(errors[0].original, SerializationError)
    assert calls["fetch"] == 3  # a failed run resumes at the failed step: it executes again each time
    failed = [e for e in await events(wf, "v2") if isinstance(e, StepFailed)]
    assert len(failed) == 3 and all(f.final for f in failed)


async def test_a_redeployed_fix_finishes_a_run_whose_step_returned_an_unstorable_value(wf: Settings) -> None:
    @step(name="lr.leaky")
    async def leaky() -> Any:
        calls["leaky"] += 1
        return object() if flags.get("broken", True) else "fixed"

    @workflow
    async def uses_leaky() -> str:
        value = await leaky()
        return f"got {value}"

    kinds = []
    for _ in range(2):
        with pytest.raises(StepFailedError) as info:
            await start_async(uses_leaky.options(settings=wf, run_id="v3"))
        kinds.append(info.value.error_type)
    assert kinds == ["werkfluss.SerializationError"] * 2
    flags["broken"] = False
    assert await start_async(uses_leaky.options(settings=wf, run_id="v3")) == "got fixed"
    assert calls["leaky"] == 3


async def test_a_workflow_result_is_checked_and_converted_like_a_steps(wf: Settings) -> None:
    @workflow
    async def pair() -> list[int]:
        return (1, 2)  # type: ignore[return-value]

    @workflow
    async def wrong() -> int:
        return "three"  # type: ignore[return-value]

    live = await start_async(pair.options(settings=wf, run_id="v4"))
    attached = await start_async(pair.options(settings=wf, run_id="v4"))
    assert live == attached == [1, 2] and type(live) is type(attached) is list
    for _ in range(2):
        with pytest.raises(SerializationError, match="does not match its annotation"):
            await start_async(wrong.options(settings=wf, run_id="v5"))
    assert (await get_run_async("v5", settings=wf)).status == "failed"


# -- 6. a timeout the body swallows still fails the attempt -------------------------------------------------------


async def test_a_step_that_swallows_its_timeout_fails_the_attempt(wf: Settings) -> None:
    @step(timeout=0.3, retries=1)
    async def stubborn() -> str:
        calls["stubborn"] += 1
        try:
            await anyio.sleep(5)
        except BaseException:  # what users write: swallow everything
            return "suppressed"
        return "slept"

    @workflow
    async def patient() -> str:
        return await stubborn()

    with pytest.raises(StepFailedError, match=r"timed out after 0\.3 s") as info:
        await start_async(patient.options(settings=wf, run_id="t1"))
    assert info.value.attempts == 2 and info.value.error_type == "TimeoutError"
    recorded = await events(wf, "t1")
    assert not [e for e in recorded if isinstance(e, StepCompleted)]
    assert [e.error.type for e in recorded if isinstance(e, StepFailed)] == ["TimeoutError", "TimeoutError"]


# -- 8. a hook that lost a race keeps its payload for a later await -----------------------------------------------


async def test_a_hook_that_lost_a_race_resumes_after_a_replay(wf: Settings) -> None:
    delivered = anyio.Event()

    @step
    async def slow_step() -> None:
        await delivered.wait()  # the payload arrives while the run is live, in this step

    @workflow
    async def approval() -> Any:
        h = hook("lr-approve")
        await race(h, sleep(0.2))  # the sleep wins: nobody answered yet
        await slow_step()
        value = await h  # taken live, from the mailbox
        await sleep(2.5)  # long enough to pause the run: what follows is a replay
        return value

    async def answer() -> None:
        with anyio.fail_after(20):
            while not [e for e in await events(wf, "h1") if isinstance(e, RaceWon)]:
                await anyio.sleep(0.02)
        await invoke_hook_async("lr-approve", {"ok": True}, settings=wf)
        delivered.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(answer)
        with anyio.fail_after(30):
            assert await start_async(approval.options(settings=wf, run_id="h1")) == {"ok": True}


async def test_a_payload_a_losing_hook_took_goes_to_the_next_await(wf: Settings) -> None:
    # The hook's payload is there, but a step that finished first wins the race;
    # whether the hook's racer took the payload or not, the later await gets it.
    @step
    async def instant() -> str:
        return "instant"

    @workflow
    async def both() -> list[Any]:
        h = hook("lr-both")
        index, _ = await race(instant(), h)
        value = await h if index == 0 else "won by the hook"
        await sleep(2.5)
        return [index, value]

    await invoke_hook_async("lr-both", 7, settings=wf)
    with anyio.fail_after(30):
        index, value = await start_async(both.options(settings=wf, run_id="h2"))
    assert value == (7 if index == 0 else "won by the hook")
    with anyio.fail_after(10):
        assert await start_async(both.options(settings=wf, run_id="h2")) == [index, value]


async def test_a_race_that_diverges_on_replay_leaves_no_coroutine_unawaited(wf: Settings) -> None:
    @step
    async def one() -> int:
        return 1

    @workflow
    async def changed() -> int:
        if calls["flaky_end"] == 0:
            await one()
            await one()
            await one()  # seq 3
        else:
            await race(hook("lr-div-1"), hook("lr-div-2"))  # the race takes seq 3 now
        await flaky_end()
        return 1

    with pytest.raises(StepFailedError):
        await start_async(changed.options(settings=wf, run_id="rd1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NonDeterminismError, match="'race'"):
            await start_async(changed.options(settings=wf, run_id="rd1"))
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
