"""fork_run and ``werkfluss runs fork``: a new run replays the calls before a seq and executes the rest.

"Fixed code" is a deploy: the tests define the workflow and its steps again
under the same names, as a new version of the module would.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from werkfluss import (
    ConfigurationError,
    RunConflictError,
    RunNotFoundError,
    Worker,
    _clock,
    _ids,
    enqueue_async,
    fork_run,
    fork_run_async,
    get_run_async,
    hook,
    invoke_hook_async,
    sleep,
    start_async,
    step,
    workflow,
)
from werkfluss.events import StepCompleted, TimerStarted

from .helpers import events, until_status

if TYPE_CHECKING:
    from collections.abc import Iterator

    from werkfluss import Settings, Workflow

    from .helpers import Cli

executions: Counter[str] = Counter()
RESET = (executions,)
NAMES = ("fork.order", "fork.waits", *(f"fork.s{i}" for i in range(1, 6)))


@pytest.fixture(autouse=True)
def registry() -> Iterator[None]:
    """Each test deploys its own versions of the workflow; what was registered comes back after."""
    saved = dict(_ids._registry)
    yield
    _ids._registry.clear()
    _ids._registry.update(saved)


def deploy(*, bug: bool) -> Workflow[[str], str]:
    """Version 1 (step 3 raises) or version 2 (fixed) of fork.order: five steps, each
    counting its executions and returning what a replay must hand back unchanged."""
    for name in NAMES:
        _ids._registry.pop(name, None)

    def counted(i: int) -> object:
        async def fn(order: str) -> str:
            executions[f"s{i}"] += 1
            if i == 3 and bug:
                raise ValueError("the bug in step 3")
            return f"{order}:s{i}#{executions[f's{i}']}"

        return step(name=f"fork.s{i}")(fn)

    steps = [counted(i) for i in range(1, 6)]

    @workflow(name="fork.order")
    async def order(order: str) -> str:
        return " ".join([await s(order) for s in steps])  # type: ignore[operator]

    return order


async def failed_run(settings: Settings, run_id: str) -> None:
    """A run of version 1: steps 1 and 2 complete, step 3 fails the run."""
    buggy = deploy(bug=True)
    with pytest.raises(Exception, match="the bug in step 3"):
        await start_async(buggy.options(run_id=run_id, settings=settings), "o")
    assert (await get_run_async(run_id, settings=settings)).status == "failed"
    assert executions == Counter(s1=1, s2=1, s3=1)


async def test_a_fork_from_the_failed_step_completes_with_the_fixed_code(wf: Settings) -> None:
    await failed_run(wf, "r1")
    deploy(bug=False)
    fork = await fork_run_async("r1", 3, settings=wf)
    assert fork == "r1~fork-1"
    async with Worker(settings=wf):
        await until_status(wf, fork, "completed")
    info = await get_run_async(fork, settings=wf)
    # Steps 1 and 2 replayed their recorded results (#1); 3 to 5 executed once, with the fix.
    assert info.result == "o:s1#1 o:s2#1 o:s3#2 o:s4#1 o:s5#1"
    assert executions == Counter(s1=1, s2=1, s3=2, s4=1, s5=1)
    assert info.args == ["o"] and info.forked_from == "r1@3" and info.forks == []
    original = await get_run_async("r1", settings=wf)
    assert original.status == "failed" and original.forks == [fork] and original.forked_from is None


async def test_a_fork_from_seq_1_executes_everything_and_forks_are_numbered(wf: Settings) -> None:
    await failed_run(wf, "r2")
    deploy(bug=False)
    first = await fork_run_async("r2", 1, settings=wf)
    second = await fork_run_async("r2", 3, settings=wf)
    assert (first, second) == ("r2~fork-1", "r2~fork-2")
    async with Worker(settings=wf):
        await until_status(wf, first, "completed")
        await until_status(wf, second, "completed")
    assert (await get_run_async(first, settings=wf)).result.startswith("o:s1#2 o:s2#2 ")  # executed again
    assert executions["s1"] == executions["s2"] == 2  # once by the original, once by the fork from 1
    assert executions["s4"] == executions["s5"] == 2  # once by each fork
    # The fork's log holds the copied completions of steps 1-2 and nothing of step 3 on.
    log = await events(wf, second)
    assert [e.seq for e in log if isinstance(e, StepCompleted)] == [1, 2, 3, 4, 5]
    assert [e.result for e in log if isinstance(e, StepCompleted)][:2] == [
        e.result for e in await events(wf, "r2") if isinstance(e, StepCompleted)
    ]
    assert (await get_run_async("r2", settings=wf)).forks == [first, second]


async def test_a_hook_payload_and_a_timer_before_the_seq_are_not_waited_for_again(wf: Settings) -> None:
    for name in NAMES:
        _ids._registry.pop(name, None)
    fixed = {"yes": False}

    @step(name="fork.s1")
    async def finish(note: str) -> str:
        executions["finish"] += 1
        if not fixed["yes"]:
            raise ValueError("the bug in finish")
        return f"done {note}"

    @workflow(name="fork.waits")
    async def waits(order: str) -> str:
        note = await hook(type=str)  # seq 1, the default token "<run>:1"
        await sleep(3600)  # seq 2
        return await finish(note)  # seq 3

    async with Worker(settings=wf):
        run_id = await enqueue_async(waits.options(run_id="w1", settings=wf), "o")
        await until_status(wf, run_id, "paused")
        await invoke_hook_async(f"{run_id}:1", "approved", settings=wf)
        with anyio.fail_after(10):  # the payload taken, the run sleeps on its timer
            while not any(isinstance(e, TimerStarted) for e in await events(wf, run_id)):
                await anyio.sleep(0.01)
        await until_status(wf, run_id, "paused")
        _clock.advance(wf.prefix, 3600)
        await until_status(wf, run_id, "failed")
        fixed["yes"] = True
        fork = await fork_run_async(run_id, 3, settings=wf)
        # No payload is delivered to the fork and the clock stays: it completes on the recorded ones.
        await until_status(wf, fork, "completed")
    assert (await get_run_async(fork, settings=wf)).result == "done approved"
    due = [e.due for e in await events(wf, run_id) if isinstance(e, TimerStarted)]
    assert [e.due for e in await events(wf, fork) if isinstance(e, TimerStarted)] == due
    assert executions["finish"] == 2


async def test_bad_input_is_refused_naming_what_is_wrong(wf: Settings) -> None:
    await failed_run(wf, "r3")
    with pytest.raises(RunNotFoundError):
        await fork_run_async("nope", 1, settings=wf)
    with pytest.raises(ConfigurationError, match="1 or more"):
        await fork_run_async("r3", 0, settings=wf)
    with pytest.raises(ConfigurationError, match=r"records calls up to seq 3; fork from 1 to 4"):
        await fork_run_async("r3", 5, settings=wf)
    with pytest.raises(ConfigurationError, match="invalid run_id"):
        await fork_run_async("r3", 1, new_run_id="has space", settings=wf)
    with pytest.raises(RunConflictError, match="exists already"):
        await fork_run_async("r3", 1, new_run_id="r3", settings=wf)
    # The same fork asked again (as after a call that died part way) is the same run.
    assert await fork_run_async("r3", 2, new_run_id="again", settings=wf) == "again"
    assert await fork_run_async("r3", 2, new_run_id="again", settings=wf) == "again"
    assert (await get_run_async("r3", settings=wf)).forks == ["again"]


async def test_the_blocking_twin_forks_too(wf: Settings) -> None:
    await failed_run(wf, "r4")
    fork = await anyio.to_thread.run_sync(lambda: fork_run("r4", 4, settings=wf))
    assert fork == "r4~fork-1"
    assert (await get_run_async(fork, settings=wf)).forked_from == "r4@4"


async def test_the_cli_forks_a_run_of_a_workflow_it_does_not_import(wf: Settings, cli: Cli) -> None:
    await failed_run(wf, "r5")
    done = await cli("runs", "fork", "r5", "--from-seq", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "r5~fork-1\n"
    named = await cli("runs", "fork", "r5", "--from-seq", "2", "--run-id", "r5-fixed")
    assert named.stdout == "r5-fixed\n"
    shown = await cli("runs", "show", "r5", "--color", "never")
    assert "forks: r5~fork-1, r5-fixed" in shown.stdout
    shown = await cli("runs", "show", "r5-fixed", "--color", "never")
    assert "forked from r5 at seq 2" in shown.stdout
    bad = await cli("runs", "fork", "r5", "--from-seq", "9")
    assert bad.returncode == 1 and "records calls up to seq 3" in bad.stderr
    deploy(bug=False)
    async with Worker(settings=wf):
        await until_status(wf, "r5~fork-1", "completed")
