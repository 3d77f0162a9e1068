"""R-15: ``start(wf.options(run_id="x"))`` called 100 times at once from 10 processes,
then 100 times again after the run completed.

Each process starts `CALLS_PER_PROCESS` concurrent `start_async` calls of the same run ID
the moment a go file appears (every process waits for it, so the calls overlap); the
first step takes 0.5 s, so every caller arrives while the run is in flight. No worker
serves: the callers execute the run among themselves. Expected: one run, its first step
executed once, every caller the same result; after completion, calls only read it.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import pytest

from werkfluss._events import RunStarted

from . import flows
from .harness import DEADLINE, pct, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROCESSES = 10
CALLS_PER_PROCESS = int(os.environ.get("WF_FAULT_START_CALLS", "10"))  # 100 calls in all

CALLER = r"""
import json, sys, time
from pathlib import Path

import anyio

from werkfluss import start_async
from tests.faults import flows

where, run_id, n, calls = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


async def calls_at(go: Path) -> list[list[object]]:
    results = []

    async def one() -> None:
        began = time.monotonic()
        try:
            value = await start_async(flows.once.options(run_id=run_id), n)
            results.append([time.monotonic() - began, value, None])
        except Exception as exc:
            results.append([time.monotonic() - began, None, f"{type(exc).__name__}: {exc}"])

    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        await anyio.sleep(0.001)
    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(one)
    return results


async def main() -> None:
    (where / f"ready-{sys.argv[5]}").touch()
    for name in ("during", "after"):
        results = await calls_at(where / f"go-{name}")
        out = where / f"{name}-{sys.argv[5]}"
        out.with_suffix(".tmp").write_text(json.dumps(results))
        out.with_suffix(".tmp").rename(out)


anyio.run(main)
"""


class Callers:
    """`PROCESSES` processes that each make `CALLS_PER_PROCESS` concurrent starts per round."""

    def __init__(self, faults: Faults, run_id: str, n: int) -> None:
        self.faults = faults
        self.where = faults.root / "callers"
        self.where.mkdir()
        self.procs = [
            faults.python(CALLER, str(self.where), run_id, str(n), str(CALLS_PER_PROCESS), str(i))
            for i in range(PROCESSES)
        ]
        faults.wait(lambda: self._all("ready-{}"), "every caller process to be ready")

    def _all(self, pattern: str) -> bool:
        for proc in self.procs:
            if proc.poll() not in (None, 0):
                pytest.fail(f"a caller process failed: {proc.communicate()[1][-3000:]}")
        return all((self.where / pattern.format(i)).exists() for i in range(PROCESSES))

    def round(self, name: str) -> list[list[Any]]:
        """Start the round's calls at once in every process; every call's ``[latency, result, error]``."""
        (self.where / f"go-{name}").touch()
        self.faults.wait(lambda: self._all(name + "-{}"), f"the {name!r} round of calls to return")
        return [call for i in range(PROCESSES) for call in json.loads((self.where / f"{name}-{i}").read_text())]

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.communicate(timeout=DEADLINE)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def test_r15_concurrent_starts_of_one_run_id_make_one_run(faults: Faults) -> None:
    run_id, n = "x", 15
    faults.env["WF_FAULT_FIRST_DELAY"] = "0.5"  # the callers pile up while step 1 runs
    callers = Callers(faults, run_id, n)
    try:
        during = callers.round("during")
        executed_during = len(faults.ledger("exec"))
        after = callers.round("after")
    finally:
        callers.close()
    figures = faults.check({run_id: flows.expected_once(n)})
    for calls in (during, after):
        assert len(calls) == PROCESSES * CALLS_PER_PROCESS
        assert [c[2] for c in calls if c[2]] == [], "no caller failed"
        assert {c[1] for c in calls} == {flows.expected_once(n)}, "every caller got the one result"
    executions = [r.key for r in faults.ledger("exec")]
    assert faults.all_runs() == [run_id], "one run"
    assert executions.count(f"{run_id}:1") == 1, "step 1 executed once"
    assert len(executions) == executed_during, "calls after completion executed nothing"
    started = [e for _, e in faults.events(run_id) if isinstance(e, RunStarted)]
    assert len(started) == 1
    report(
        f"R-15 concurrent starts [{faults.kind}]",
        **figures,
        callers=PROCESSES * CALLS_PER_PROCESS,
        processes=PROCESSES,
        runs_created=len(faults.all_runs()),
        step_1_executions=executions.count(f"{run_id}:1"),
        executions_after_completion=len(executions) - executed_during,
        resumes=len(faults.resumes(run_id)),
        latency_during_p50_p99_s=[pct((c[0] for c in during), 50), pct((c[0] for c in during), 99)],
        attach_after_completion_p50_p99_s=[pct((c[0] for c in after), 50), pct((c[0] for c in after), 99)],
    )
