"""Patch markers: ``patched(name)`` and ``deprecate_patch(name)`` under runs of older and newer code.

Each test deploys versions of one workflow in turn, as a deploy would: the workflow ID is
taken over by the newer function (the `registry` fixture puts the real registry back).
Runs are paused on a hook on one version and resumed on the next, on real servers.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from werkfluss import (
    ConfigurationError,
    NonDeterminismError,
    NotInWorkflowError,
    Settings,
    StepFailedError,
    _ids,
    deprecate_patch,
    hook,
    invoke_hook_async,
    patched,
    start_async,
    step,
    workflow,
)
from werkfluss._events import PatchMarked, StepCompleted
from werkfluss.testing import check_replay_async

from .helpers import events, status, until_status

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from werkfluss import Step, Workflow

calls: Counter[str] = Counter()
RESET = (calls,)  # What conftest's `wf` clears before each test.
FLOW = "patch.order"


@pytest.fixture
def registry() -> Iterator[None]:
    saved = dict(_ids._registry)
    yield
    _ids._registry.clear()
    _ids._registry.update(saved)


def deploy(fn: Callable[[str], Awaitable[str]]) -> Workflow[[str], str]:
    """`fn` as the code of workflow FLOW from now on."""
    _ids._registry.pop(FLOW, None)
    return workflow(name=FLOW)(fn)


def make(name: str) -> Step[[str], str]:
    @step(name=f"patch.{name}")
    async def body(order: str) -> str:
        calls[name] += 1
        return name

    return body


reserve, charge, charge_v2, ship, ship_v2, audit = (
    make(n) for n in ("reserve", "charge", "charge_v2", "ship", "ship_v2", "audit")
)


async def v1(order: str) -> str:
    """The old code: the charge before the hook."""
    got = [await reserve(order), await charge(order)]
    await hook(f"go:{order}")
    return " ".join([*got, await ship(order)])


async def v2(order: str) -> str:
    """The charge patched: the new branch where the old one was."""
    got = [await reserve(order)]
    got.append(await charge_v2(order) if patched("charge-v2") else await charge(order))
    await hook(f"go:{order}")
    return " ".join([*got, await ship(order)])


async def v3(order: str) -> str:
    """The old branch deleted."""
    got = [await reserve(order)]
    deprecate_patch("charge-v2")
    got.append(await charge_v2(order))
    await hook(f"go:{order}")
    return " ".join([*got, await ship(order)])


async def pause_on(flow: Workflow[[str], str], order: str, wf: Settings) -> None:
    """Start a run of `flow` and leave it paused on its hook (its process gone)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start_async(flow.options(run_id=order, settings=wf), order))
        await until_status(wf, order, "paused")
        tg.cancel_scope.cancel()


async def finish(flow: Workflow[[str], str], order: str, wf: Settings, token: str | None = None) -> str:
    """Deliver the run's hook and drive it to its end on `flow`."""
    await invoke_hook_async(token or f"go:{order}", True, settings=wf)
    with anyio.fail_after(20):
        return await start_async(flow.options(run_id=order, settings=wf), order)


async def markers(wf: Settings, run_id: str) -> list[tuple[str, int]]:
    return [(e.name, e.seq) for e in await events(wf, run_id) if isinstance(e, PatchMarked)]


async def steps(wf: Settings, run_id: str) -> list[tuple[int, str]]:
    return [(e.seq, e.step) for e in await events(wf, run_id) if isinstance(e, StepCompleted)]


NEW_ORDER = [(1, "patch.reserve"), (2, "patch.charge_v2"), (4, "patch.ship")]


# --- the combinations ---------------------------------------------------------------------------------------------


async def test_a_run_that_passed_the_point_on_the_old_code_keeps_the_old_branch(wf: Settings, registry: None) -> None:
    await pause_on(deploy(v1), "old", wf)
    new = deploy(v2)
    assert await finish(new, "old", wf) == "reserve charge ship"
    assert calls == {"reserve": 1, "charge": 1, "ship": 1}  # nothing of the new branch, nothing twice
    assert await markers(wf, "old") == []
    # The hook's payload is at seq 3, the ship at 4: patched() took no number.
    assert [s for s, _ in await steps(wf, "old")] == [1, 2, 4]
    check = await check_replay_async(new, "old", settings=wf)
    assert check.ok and check.patches == {"charge-v2": False}


async def test_a_new_run_takes_the_new_branch_and_records_the_marker_first(wf: Settings, registry: None) -> None:
    new = deploy(v2)
    await pause_on(new, "new", wf)
    assert await markers(wf, "new") == [("charge-v2", 2)]  # the seq of the call after it
    log = await events(wf, "new")
    marker = next(i for i, e in enumerate(log) if isinstance(e, PatchMarked))
    charged = next(i for i, e in enumerate(log) if isinstance(e, StepCompleted) and e.seq == 2)
    assert marker < charged  # a replay finds the marker before anything after it
    # Replayed in another process: the marker says new branch again, nothing executes twice.
    assert await finish(new, "new", wf) == "reserve charge_v2 ship"
    assert calls == {"reserve": 1, "charge_v2": 1, "ship": 1}
    assert await steps(wf, "new") == NEW_ORDER
    assert await markers(wf, "new") == [("charge-v2", 2)]  # recorded once
    check = await check_replay_async(new, "new", settings=wf)
    assert check.ok and check.patches == {"charge-v2": True}


async def early_v1(order: str) -> str:
    """The hook before the point the patch changes."""
    first = await reserve(order)
    await hook(f"go:{order}")
    return " ".join([first, await charge(order)])


async def early_v2(order: str) -> str:
    first = await reserve(order)
    await hook(f"go:{order}")
    return " ".join([first, await charge_v2(order) if patched("charge-v2") else await charge(order)])


@pytest.mark.parametrize("started_on", ["old", "new"])
async def test_a_run_paused_before_the_point_takes_the_new_branch(
    wf: Settings, registry: None, started_on: str
) -> None:
    await pause_on(deploy(early_v1 if started_on == "old" else early_v2), "between", wf)
    new = deploy(early_v2)
    before = await check_replay_async(new, "between", settings=wf)
    assert before.ok and before.patches == {}  # its history ends at the hook, before patched()
    assert await finish(new, "between", wf) == "reserve charge_v2"
    assert calls == {"reserve": 1, "charge_v2": 1}
    assert await markers(wf, "between") == [("charge-v2", 3)]
    after = await check_replay_async(new, "between", settings=wf)
    assert after.ok and after.patches == {"charge-v2": True}


async def test_deprecate_patch_replays_runs_that_recorded_the_marker(wf: Settings, registry: None) -> None:
    await pause_on(deploy(v2), "marked", wf)
    done = deploy(v3)
    assert await finish(done, "marked", wf) == "reserve charge_v2 ship"
    assert calls == {"reserve": 1, "charge_v2": 1, "ship": 1}
    check = await check_replay_async(done, "marked", settings=wf)
    assert check.ok and check.patches == {}  # a marker no code reaches is not a divergence
    # A new run on the deprecated code records nothing.
    await pause_on(done, "fresh", wf)
    assert await markers(wf, "fresh") == [] and await steps(wf, "fresh") == NEW_ORDER[:2]


async def test_removing_the_patch_too_early_blocks_the_old_run_naming_the_step_and_patch(
    wf: Settings, registry: None
) -> None:
    await pause_on(deploy(v1), "early", wf)
    done = deploy(v3)
    check = await check_replay_async(done, "early", settings=wf)
    assert check.divergence is not None
    assert (check.divergence.seq, check.divergence.recorded, check.divergence.current) == (
        2, "patch.charge", "patch.charge_v2",
    )  # fmt: skip
    with pytest.raises(NonDeterminismError) as caught:
        await finish(done, "early", wf)
    message = str(caught.value)
    assert "step #2 was recorded as 'patch.charge'" in message and "'patch.charge_v2'" in message
    assert "deprecate_patch('charge-v2')" in message and "patched('charge-v2')" in message
    assert caught.value.seq == 2 and caught.value.hint
    assert await status(wf, "early") == "blocked"
    assert calls == {"reserve": 1, "charge": 1}  # nothing after the divergence executed
    # Putting the patch back lets the blocked run finish on its old branch.
    assert await finish(deploy(v2), "early", wf, token="unused") == "reserve charge ship"


async def test_an_unrelated_divergence_names_no_patch(wf: Settings, registry: None) -> None:
    await pause_on(deploy(v2), "other", wf)  # marked: deprecate_patch has nothing to say about it

    async def v3_reordered(order: str) -> str:
        deprecate_patch("charge-v2")
        got = [await charge_v2(order), await reserve(order)]
        return " ".join(got)

    check = await check_replay_async(deploy(v3_reordered), "other", settings=wf)
    assert check.divergence is not None and check.divergence.seq == 1
    assert "deprecate_patch" not in check.divergence.message


async def two_v2(order: str) -> str:
    got = [await reserve(order)]
    got.append(await charge_v2(order) if patched("charge-v2") else await charge(order))
    await hook(f"go:{order}")
    got.append(await ship_v2(order) if patched("ship-v2") else await ship(order))
    return " ".join(got)


async def test_two_patches_in_one_workflow_decide_each_where_it_is(wf: Settings, registry: None) -> None:
    await pause_on(deploy(v1), "two", wf)
    new = deploy(two_v2)
    # Passed the charge on the old code, not yet the ship: old charge, new ship.
    assert await finish(new, "two", wf) == "reserve charge ship_v2"
    assert await markers(wf, "two") == [("ship-v2", 4)]
    check = await check_replay_async(new, "two", settings=wf)
    assert check.ok and check.patches == {"charge-v2": False, "ship-v2": True}
    await pause_on(new, "two-new", wf)
    assert await finish(new, "two-new", wf) == "reserve charge_v2 ship_v2"
    assert await markers(wf, "two-new") == [("charge-v2", 2), ("ship-v2", 4)]


async def loop_v1(order: str) -> str:
    got = []
    for i in range(4):
        got.append(await charge(f"{order}-{i}"))
        if i == 1:
            await hook(f"go:{order}")
    return " ".join(got)


async def loop_v2(order: str) -> str:
    got = []
    for i in range(4):
        got.append(await charge_v2(f"{order}-{i}") if patched("charge-v2") else await charge(f"{order}-{i}"))
        if i == 1:
            await hook(f"go:{order}")
    return " ".join(got)


async def test_a_patch_in_a_loop_keeps_a_runs_first_decision(wf: Settings, registry: None) -> None:
    await pause_on(deploy(loop_v1), "loop-old", wf)
    new = deploy(loop_v2)
    # Two iterations passed on the old code: the two after them keep the old branch too.
    assert await finish(new, "loop-old", wf) == "charge charge charge charge"
    assert calls == {"charge": 4} and await markers(wf, "loop-old") == []
    await pause_on(new, "loop-new", wf)
    assert await finish(new, "loop-new", wf) == "charge_v2 charge_v2 charge_v2 charge_v2"
    assert await markers(wf, "loop-new") == [("charge-v2", 1)]  # once, where first reached
    for run_id, took in (("loop-old", False), ("loop-new", True)):
        check = await check_replay_async(new, run_id, settings=wf)
        assert check.ok and check.patches == {"charge-v2": took}


async def branch_v2(order: str) -> str:
    first = await reserve(order)
    if order.startswith("vip") and patched("vip-v2"):
        return first + " " + await ship_v2(order)
    return first + " " + await ship(order)


async def test_a_patch_in_a_branch_not_taken_records_nothing(wf: Settings, registry: None) -> None:
    new = deploy(branch_v2)
    assert await start_async(new.options(run_id="plain", settings=wf), "plain") == "reserve ship"
    assert await start_async(new.options(run_id="vip-1", settings=wf), "vip-1") == "reserve ship_v2"
    assert await markers(wf, "plain") == [] and await markers(wf, "vip-1") == [("vip-v2", 2)]
    plain = await check_replay_async(new, "plain", settings=wf)
    vip = await check_replay_async(new, "vip-1", settings=wf)
    assert (plain.ok, plain.patches, vip.ok, vip.patches) == (True, {}, True, {"vip-v2": True})


async def pending_v1(order: str) -> str:
    first = await reserve(order)
    await hook()  # its default token carries its seq: <run>:2
    return first + " " + await ship(order)


async def pending_v2(order: str) -> str:
    first = await reserve(order)
    if patched("audit"):
        await audit(order)
    await hook()
    return first + " " + await ship(order)


async def test_a_run_paused_on_a_hook_past_the_point_keeps_the_old_branch(wf: Settings, registry: None) -> None:
    # Nothing is recorded at or after the point yet, but the run waits on the hook at seq 2:
    # the new branch would renumber it to 3, and its payload would never arrive.
    await pause_on(deploy(pending_v1), "waiting", wf)
    new = deploy(pending_v2)
    assert await finish(new, "waiting", wf, token="waiting:2") == "reserve ship"
    assert "audit" not in calls and await markers(wf, "waiting") == []


# --- misuse ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [patched, deprecate_patch])
def test_outside_a_run_is_refused(call: Callable[[str], object]) -> None:
    with pytest.raises(NotInWorkflowError, match="workflow body"):
        call("charge-v2")


@pytest.mark.parametrize("name", ["", "x" * 101, "a\nb", "tab\there", 7, None])
@pytest.mark.parametrize("call", [patched, deprecate_patch])
def test_a_bad_name_is_refused(call: Callable[[Any], object], name: object) -> None:
    with pytest.raises(ConfigurationError, match="patch name is 1-100 printable characters"):
        call(name)


@step(name="patch.asks")
async def asks(order: str) -> str:
    return "new" if patched("in-a-step") else "old"


async def test_in_a_step_is_refused(wf: Settings, registry: None) -> None:
    async def in_step(order: str) -> str:
        return await asks(order)

    with pytest.raises(StepFailedError) as caught:
        await start_async(deploy(in_step).options(run_id="in-step", settings=wf), "in-step")
    assert caught.value.error_type == "werkfluss.NotInWorkflowError"
