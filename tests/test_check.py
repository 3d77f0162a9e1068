"""The pre-deploy check (`check_deploy`, ``werkfluss check``): a fleet recorded on
version 1, replayed against version 2 (tests/check_flows.py), on real servers."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

import werkfluss
from werkfluss import (
    ConfigurationError,
    NonDeterminismError,
    Settings,
    StepFailedError,
    _ids,
    enqueue_async,
    get_events_async,
    hook,
    invoke_hook_async,
    start_async,
    step,
    workflow,
)
from werkfluss._check import check_deploy, check_deploy_async, iter_check_async
from werkfluss.events import RunPaused
from werkfluss.testing import check_replay_async

from . import check_flows
from .check_flows import a, b, executions, finish
from .helpers import status, until_status

if TYPE_CHECKING:
    from collections.abc import Iterator

    from werkfluss import Workflow

    from .helpers import Cli

RESET = (executions,)
V1_IDS = ("chk.inserted", "chk.renamed", "chk.retyped", "chk.appended", "chk.quote", "chk.argtyped")


class QuoteV1(msgspec.Struct, frozen=True):
    price: str  # version 2 made it an int


def define_v1() -> dict[str, Workflow[..., str]]:
    """Version 1 of the fleet's workflows, under version 2's IDs (the registry is the caller's to restore)."""
    for ident in V1_IDS:
        _ids._registry.pop(ident, None)

    @step(name="chk.quote")
    async def quote_v1(order: str) -> QuoteV1:
        return QuoteV1(price="12.00")

    @workflow(name="chk.inserted")
    async def inserted(order: str) -> str:
        await a(order)
        await b(order)
        await finish(order)
        return str(await hook(f"go:{order}", type=bool))

    @workflow(name="chk.renamed")
    async def renamed(order: str) -> str:
        await a(order)
        await b(order)
        await finish(order)
        return str(await hook(f"go:{order}", type=bool))

    @workflow(name="chk.retyped")
    async def retyped(order: str) -> str:
        priced = await quote_v1(order)
        await b(order)
        await finish(order)
        return priced.price + str(await hook(f"go:{order}", type=bool))

    @workflow(name="chk.appended")
    async def appended(order: str) -> str:
        await a(order)
        await b(order)
        await finish(order)
        return str(await hook(f"go:{order}", type=bool))

    return {"unchanged": check_flows.unchanged, "inserted": inserted, "renamed": renamed} | {
        "retyped": retyped,
        "appended": appended,
    }


def define_v1_argtyped() -> Workflow[..., str]:
    """Version 1 of chk.argtyped, which took the order as a string (version 2: an int)."""
    _ids._registry.pop("chk.argtyped", None)

    @workflow(name="chk.argtyped")
    async def argtyped(order: str) -> str:
        return order

    return argtyped


@pytest.fixture
def registry() -> Iterator[dict[str, Any]]:
    """The registry as version 2 defines it: `restore` puts it back after version 1 recorded its runs."""
    saved = dict(_ids._registry)
    yield saved
    restore(saved)


def restore(saved: dict[str, Any]) -> None:
    _ids._registry.clear()
    _ids._registry.update(saved)


async def paused(flow: Workflow[..., str], run_id: str, settings: Settings) -> None:
    """Start a run of `flow` and leave it paused on its hook."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start_async(flow.options(run_id=run_id, settings=settings), run_id))
        await until_status(settings, run_id, "paused")
        tg.cancel_scope.cancel()


async def failed(flow: Workflow[..., str], run_id: str, settings: Settings) -> None:
    assert run_id.startswith("bad")
    with pytest.raises(StepFailedError, match="cannot finish"):
        await start_async(flow.options(run_id=run_id, settings=settings), run_id)


# The fleet: run ID -> the verdict version 2 must get.
EXPECTED = {
    "unchanged-1": "clean",
    "bad-unchanged-2": "clean",
    "bad-unchanged-blocked": "clean",  # blocked by a bad interim deploy; version 2 replays it again
    "inserted-1": "diverges",
    "bad-inserted-2": "diverges",
    "bad-inserted-blocked": "diverges",
    "renamed-1": "diverges",
    "bad-renamed-2": "diverges",
    "retyped-1": "schema",
    "bad-retyped-2": "schema",
    "appended-1": "clean",
    "bad-appended-2": "clean",
    "argtyped-pending": "schema",  # not started yet, but its recorded argument no longer decodes
}


async def fleet(settings: Settings) -> None:
    """Record version 1's runs: paused, failed, blocked; and runs the check must pass over."""
    v1 = define_v1()
    for name, flow in v1.items():
        await paused(flow, f"{name}-1", settings)
        await failed(flow, f"bad-{name}-2", settings)
    await failed(v1["unchanged"], "bad-unchanged-blocked", settings)
    await failed(v1["inserted"], "bad-inserted-blocked", settings)
    # Completed and cancelled runs are not in flight; a pending one that recorded nothing starts on v2.
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start_async(v1["unchanged"].options(run_id="done-1", settings=settings), "done-1"))
        await until_status(settings, "done-1", "paused")
        await invoke_hook_async("go:done-1", True, settings=settings)
    assert await status(settings, "done-1") == "completed"
    await enqueue_async(check_flows.unchanged.options(run_id="fresh-1", settings=settings), "fresh-1")
    await enqueue_async(define_v1_argtyped().options(run_id="argtyped-pending", settings=settings), "o-7")

    # A deploy in between that broke chk.unchanged, and version 2 of chk.inserted: both block a failed run.
    _ids._registry.pop("chk.unchanged", None)

    @workflow(name="chk.unchanged")
    async def interim(order: str) -> str:
        await a(order)
        return await check_flows.inserted_step(order)

    with pytest.raises(NonDeterminismError):
        await start_async(interim.options(run_id="bad-unchanged-blocked", settings=settings), "bad-unchanged-blocked")
    with pytest.raises(NonDeterminismError):
        await start_async(
            check_flows.inserted.options(run_id="bad-inserted-blocked", settings=settings), "bad-inserted-blocked"
        )
    for run_id in ("bad-unchanged-blocked", "bad-inserted-blocked"):
        assert await status(settings, run_id) == "blocked"
    executions.clear()


async def test_the_check_reports_each_run_of_the_fleet_as_expected(wf: Settings, registry: dict[str, Any]) -> None:
    await fleet(wf)
    restore(registry)
    verdicts = {v.run_id: v async for v in iter_check_async(check_flows, settings=wf, concurrency=3)}

    matrix: Counter[tuple[str, str]] = Counter()
    matrix.update((EXPECTED.get(run_id, "not checked"), v.verdict) for run_id, v in verdicts.items())
    matrix.update((expected, "not checked") for run_id, expected in EXPECTED.items() if run_id not in verdicts)
    assert matrix == Counter({("clean", "clean"): 5, ("diverges", "diverges"): 5, ("schema", "schema"): 3})
    assert {r: v.verdict for r, v in verdicts.items()} == EXPECTED
    assert executions == {}  # the check executed no step

    inserted = verdicts["inserted-1"].mismatch
    assert inserted is not None
    assert (inserted.seq, inserted.recorded, inserted.recorded_args) == (2, "chk.b", "('inserted-1')")
    assert inserted.current == "calls 'chk.inserted_step'"
    assert verdicts["inserted-1"].describe() == (
        "diverges at #2: recorded chk.b('inserted-1'), now calls 'chk.inserted_step'"
    )
    renamed = verdicts["bad-renamed-2"].mismatch
    assert renamed is not None and (renamed.seq, renamed.recorded) == (2, "chk.b")
    assert renamed.current == "calls 'chk.b_renamed'"
    (problem,) = verdicts["retyped-1"].schema
    assert (problem.seq, problem.owner, problem.where) == (1, "chk.quote", "result")
    assert "Expected `int`, got `str`" in problem.error and "$.price" in problem.error
    assert verdicts["retyped-1"].describe().startswith("schema: #1 chk.quote result no longer decodes")
    (argument,) = verdicts["argtyped-pending"].schema
    assert (argument.seq, argument.owner, argument.where) == (None, "chk.argtyped", "argument 0")
    assert "Expected `int`, got `str`" in argument.error
    status_of = {"blocked": "blocked", "pending": "pending", "bad": "failed"}
    assert {r: v.status for r, v in verdicts.items()} == {
        r: next((s for k, s in status_of.items() if k in r), "paused") for r in EXPECTED
    }
    assert verdicts["appended-1"].replayed == 3 and verdicts["bad-unchanged-2"].replayed == 3  # up to the hook

    # The same answers as werkfluss.testing.check_replay, run by run (schema aside: it stops at the first).
    for run_id, verdict in verdicts.items():
        if verdict.verdict == "schema":
            continue
        flow = getattr(check_flows, verdict.workflow.removeprefix("chk."))
        replayed = await check_replay_async(flow, run_id, settings=wf)
        m, d = verdict.mismatch, replayed.divergence
        assert (m is None) == (d is None), run_id
        assert m is None or d is None or (m.seq, m.recorded, m.message) == (d.seq, d.recorded, d.message)

    report = await check_deploy_async("tests.check_flows", settings=wf)
    assert (report.checked, report.clean, report.diverged, report.schema, report.fresh) == (13, 5, 5, 3, 1)
    assert not report.ok and {v.run_id for v in report.blocking} == {r for r, v in EXPECTED.items() if v != "clean"}
    assert report.summary() == "13 runs: 5 clean, 5 diverge, 3 schema; 1 pending with no history not replayed"
    only = await check_deploy_async(check_flows, workflow="chk.unchanged", settings=wf)
    assert only.ok and only.checked == 3 and only.blocking == []
    limited = await check_deploy_async(check_flows, limit=4, settings=wf)
    assert limited.checked == 4 and limited.truncated


async def test_the_blocking_call_and_bad_targets(wf: Settings, registry: dict[str, Any]) -> None:
    await paused(check_flows.unchanged, "unchanged-s", wf)
    report = await anyio.to_thread.run_sync(lambda: check_deploy(check_flows.unchanged, settings=wf))
    assert report.ok and report.checked == 1 and report.workflows == ["chk.unchanged"]
    with pytest.raises(ConfigurationError, match=r"cannot import 'tests.no_such_module'"):
        await check_deploy_async("tests.no_such_module", settings=wf)
    with pytest.raises(ConfigurationError, match=r"module 'tests.helpers' defines no workflows"):
        await check_deploy_async("tests.helpers", settings=wf)
    with pytest.raises(ConfigurationError, match=r"workflow 'chk.nope' is not defined there"):
        await check_deploy_async(check_flows, workflow="chk.nope", settings=wf)
    with pytest.raises(ConfigurationError, match=r"invalid limit 0"):
        await check_deploy_async(check_flows, limit=0, settings=wf)
    assert (await check_deploy_async("tests.check_flows:unchanged", settings=wf)).workflows == ["chk.unchanged"]


async def test_the_command_exit_codes_table_and_json(wf: Settings, registry: dict[str, Any], cli: Cli) -> None:
    await fleet(wf)
    restore(registry)
    done = await cli("check", "tests.check_flows", "--json")
    assert done.returncode == 1, done.stderr
    answer = json.loads(done.stdout)
    assert {r["run_id"]: r["verdict"] for r in answer["runs"]} == EXPECTED
    assert answer["counts"] == {"checked": 13, "clean": 5, "patched": 0, "diverged": 5, "schema": 3, "fresh": 1}
    assert answer["ok"] is False
    by_id = {r["run_id"]: r for r in answer["runs"]}
    assert by_id["inserted-1"]["mismatch"]["seq"] == 2 and by_id["retyped-1"]["schema"][0]["owner"] == "chk.quote"

    table = await cli("check", "tests.check_flows")
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["RUN", "WORKFLOW", "STATUS", "VERDICT"]
    assert any(line.split()[:3] == ["inserted-1", "chk.inserted", "paused"] and "diverges at #2" in line
               for line in lines)  # fmt: skip
    assert lines[-1] == "13 runs: 5 clean, 5 diverge, 3 schema; 1 pending with no history not replayed"

    clean = await cli("check", "tests.check_flows", "--workflow", "chk.unchanged")
    assert clean.returncode == 0, clean.stderr
    assert (
        clean.stdout.splitlines()[-1] == "3 runs: 3 clean, 0 diverge, 0 schema; 1 pending with no history not replayed"
    )

    for args, needle in (
        (("tests.no_such_module",), "cannot import 'tests.no_such_module'"),
        (("tests.check_flows", "--workflow", "chk.nope"), "defines no workflow 'chk.nope'"),
        (("tests.check_flows", "--limit", "0"), "invalid --limit 0"),
    ):
        bad = await cli("check", *args)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
        assert bad.stdout == "" and "Traceback" not in bad.stderr
        (line,) = bad.stderr.strip().splitlines()
        assert line.startswith("werkfluss: ") and needle in line


async def test_patch_markers_are_reported_with_each_runs_branch(wf: Settings, registry: dict[str, Any]) -> None:
    patched = getattr(werkfluss, "patched", None)
    if patched is None:
        pytest.skip("werkfluss has no patch markers in this tree")
    _ids._registry.pop("chk.patchy", None)

    @workflow(name="chk.patchy")
    async def v1(order: str) -> str:
        await a(order)
        await b(order)
        return str(await hook(f"go:{order}", type=bool))

    await paused(v1, "patchy-old", wf)
    _ids._registry.pop("chk.patchy", None)

    @workflow(name="chk.patchy")
    async def v2(order: str) -> str:
        await a(order)
        if patched("p1"):
            await check_flows.b_renamed(order)
        else:
            await b(order)
        return str(await hook(f"go:{order}", type=bool))

    await paused(v2, "patchy-new", wf)
    executions.clear()
    verdicts = {v.run_id: v async for v in iter_check_async(v2, settings=wf)}
    assert {r: (v.verdict, v.patches) for r, v in verdicts.items()} == {
        "patchy-old": ("patched", {"p1": False}),
        "patchy-new": ("patched", {"p1": True}),
    }
    assert verdicts["patchy-old"].describe() == "replays; patch 'p1': old branch"
    assert verdicts["patchy-new"].describe() == "replays; patch 'p1': new branch"
    report = await check_deploy_async(v2, settings=wf)
    assert report.ok and (report.clean, report.patched) == (2, 2) and executions == {}
    assert report.summary() == "2 runs: 2 clean (2 patched), 0 diverge, 0 schema"


async def test_a_recorded_hook_payload_that_no_longer_decodes(wf: Settings, registry: dict[str, Any]) -> None:
    _ids._registry.pop("chk.payload", None)

    @workflow(name="chk.payload")
    async def v1(order: str) -> str:
        approval = await hook(f"pay:{order}", type=dict)
        await a(order)
        return str(approval) + str(await hook(f"go:{order}", type=bool))

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start_async(v1.options(run_id="pay-1", settings=wf), "pay-1"))
        await until_status(wf, "pay-1", "paused")
        await invoke_hook_async("pay:pay-1", {"note": "ok"}, settings=wf)
        with anyio.fail_after(10):  # paused again, on its second hook
            while sum(isinstance(e, RunPaused) for e in await get_events_async("pay-1", settings=wf)) < 2:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    restore(registry)
    (verdict,) = [v async for v in iter_check_async(check_flows.payload, settings=wf)]
    assert verdict.verdict == "schema" and verdict.mismatch is None
    (problem,) = verdict.schema
    assert (problem.seq, problem.owner, problem.where) == (1, "hook 'pay:pay-1'", "payload")
    assert "missing required field `amount`" in problem.error
