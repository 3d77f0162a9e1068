"""werkfluss.testing: replay checks against recorded runs, and the pytest fixtures."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from werkfluss import (
    ConfigurationError,
    Settings,
    _ids,
    get_events_async,
    get_run_async,
    hook,
    start_async,
    step,
    workflow,
)
from werkfluss._store._open import close_stores, open_store
from werkfluss.testing import assert_replays, check_replay_async

from .shop_flows import SECRET, attempts, charge, checkout, executions, reserve, run_checkout, ship

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from werkfluss import Workflow

RESET = (attempts, executions)  # What conftest's `wf` clears before each test.


@pytest.fixture
def registry() -> Iterator[None]:
    """The tests define new versions of shop.checkout, as a deploy would: the ID is
    free for them (one version per process is the rule), and the real one comes back."""
    saved = dict(_ids._registry)
    del _ids._registry["shop.checkout"]
    yield
    _ids._registry.clear()
    _ids._registry.update(saved)


def version(fn: Callable[[str, str], Awaitable[str]]) -> Workflow[[str, str], str]:
    """Another version of shop.checkout, as a deploy brings it (the `registry` fixture restores the real one)."""
    _ids._registry.pop("shop.checkout", None)
    return workflow(name="shop.checkout")(fn)


@step(name="shop.gift_wrap")
async def gift_wrap(order: str) -> str:
    executions["gift_wrap"] += 1
    return "wrapped"


async def recorded(settings: Settings, order: str) -> None:
    assert await run_checkout(settings, order) == f"{order} shipped receipt-{order}-{SECRET}"
    executions.clear()


async def test_unchanged_code_replays_the_run_without_executing_a_step(wf: Settings) -> None:
    await recorded(wf, "ok-r1")
    result = await check_replay_async(checkout, "ok-r1", settings=wf)
    assert result.ok and result.divergence is None
    assert result.replayed == 4  # reserve, charge, the hook, ship
    assert executions == {} and (await get_run_async("ok-r1", settings=wf)).status == "completed"


async def test_reordered_steps_are_reported_at_the_first_divergence(wf: Settings, registry: None) -> None:
    await recorded(wf, "ok-r2")

    @version
    async def reordered(order: str, note: str = SECRET) -> str:
        receipt = await charge(order)  # was second
        parcels = await reserve(order)
        return await ship(order, parcels) + receipt

    result = await check_replay_async(reordered, "ok-r2", settings=wf)
    assert not result.ok and result.divergence is not None
    d = result.divergence
    assert (d.seq, d.recorded, d.current) == (1, "shop.reserve", "shop.charge")
    assert "ok-r2" in d.message and "#1" in d.message
    assert executions == {}
    with pytest.raises(AssertionError, match=r"step #1 was recorded as 'shop.reserve' but the workflow now calls"):
        await anyio.to_thread.run_sync(lambda: assert_replays(reordered, "ok-r2", settings=wf))


async def test_a_step_appended_at_the_end_replays_and_a_removed_one_does_not(wf: Settings, registry: None) -> None:
    await recorded(wf, "ok-r3")

    @version
    async def appended(order: str, note: str = SECRET) -> str:
        result = await checkout.fn(order, note)
        return result + await gift_wrap(order)

    ok = await check_replay_async(appended, "ok-r3", settings=wf)
    assert ok.ok and ok.replayed == 4 and executions == {}

    @version
    async def shortened(order: str, note: str = SECRET) -> str:
        await reserve(order)
        return await charge(order)

    tail = await check_replay_async(shortened, "ok-r3", settings=wf)
    assert tail.divergence is not None
    assert (tail.divergence.seq, tail.divergence.recorded) == (3, "hook:approve:ok-r3")
    assert tail.divergence.current == "nothing: the workflow returned"


async def test_a_paused_run_is_checked_up_to_where_it_waits_and_offline(wf: Settings, registry: None) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start_async(checkout.options(run_id="ok-r4", settings=wf), "ok-r4"))
        store = await open_store(wf)
        with anyio.fail_after(10):
            while await store.status("ok-r4") != "paused":
                await anyio.sleep(0.01)
        events = await get_events_async("ok-r4", settings=wf)
        tg.cancel_scope.cancel()
    executions.clear()
    online = await check_replay_async(checkout, "ok-r4", settings=wf)
    assert online.ok and online.replayed == 2  # the hook has no payload yet: the history ends there
    offline = await check_replay_async(
        checkout, "ok-r4", events=events, settings=Settings(redis_url="redis://127.0.0.1:1")
    )
    assert offline == online and executions == {}

    @version
    async def ships_early(order: str, note: str = SECRET) -> str:
        parcels = await reserve(order)
        shipped = await ship(order, parcels)  # where the log has the charge
        return shipped + str(await hook(f"approve:{order}"))

    moved = await check_replay_async(ships_early, "ok-r4", events=events)
    assert moved.divergence is not None
    assert (moved.divergence.seq, moved.divergence.recorded, moved.divergence.current) == (
        2, "shop.charge", "shop.ship",
    )  # fmt: skip
    assert executions == {}


async def test_a_failed_run_replays_its_failure(wf: Settings) -> None:
    assert isinstance(await run_checkout(wf, "bad-r5"), Exception)
    executions.clear()
    result = await check_replay_async(checkout, "bad-r5", settings=wf)
    assert result.ok and result.replayed == 4 and executions == {}


async def test_another_workflows_run_is_refused(wf: Settings) -> None:
    await recorded(wf, "ok-r6")

    @workflow(name="shop.other")
    async def other(order: str) -> str:
        return order

    with pytest.raises(ConfigurationError, match=r"'ok-r6' is a run of workflow 'shop\.checkout', not 'shop\.other'"):
        await check_replay_async(other, "ok-r6", settings=wf)


# -- the fixtures of the pytest plugin -------------------------------------------------------------------------------


@step
async def add_one(x: int) -> int:
    return x + 1


@workflow
async def plus_one(x: int) -> int:
    return await add_one(x)


async def test_the_werkfluss_settings_fixture_gives_a_throwaway_server(werkfluss_settings: Settings) -> None:
    assert werkfluss_settings.redis_url is None and "werkfluss-test-" in werkfluss_settings.directory
    assert await start_async(plus_one.options(run_id="fx-1"), 41) == 42  # no settings: the fixture's by default
    run = await get_run_async("fx-1", settings=werkfluss_settings)
    assert (run.status, run.result) == ("completed", 42)
    await close_stores()
