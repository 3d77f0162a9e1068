"""R-31: a poison run whose step kills its worker (``os._exit(1)``) on every attempt, among
healthy runs. Two workers serve with ``--max-deliveries N``; whenever one dies the test
starts another, as a process supervisor would. After N deliveries the poison message must
go to the dead letters; the healthy runs must all complete; after a fix (a worker with
``WF_FAULT_POISON_FIXED``), ``werkfluss dead redrive`` must bring the run to completion.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest

from werkfluss._events import RunCompleted

from ..conftest import ROOT, wait_for
from . import flows
from .harness import DEADLINE, pct, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

N = int(os.environ.get("WF_FAULT_MAX_DELIVERIES", "3"))
HEALTHY = int(os.environ.get("WF_FAULT_HEALTHY", "40"))  # RELIABILITY.md: 100
NEIGHBOURS = int(os.environ.get("WF_FAULT_NEIGHBOURS", "100"))  # healthy runs enqueued with the poison


def supervise(faults: Faults, until: Any, what: str, *args: str, keep: int = 2) -> int:
    """Keep `keep` workers alive (restarting dead ones) until `until()` holds; returns the restarts."""
    restarts = 0
    deadline = time.monotonic() + DEADLINE
    while not until():
        for _ in range(keep - len(faults.workers.alive())):
            faults.workers.spawn(*args)
            restarts += 1
        if time.monotonic() > deadline:
            letters = [(d.get("r"), d.get("reason", "")[:80]) for d in faults.dead_letters()]
            pytest.fail(f"timed out waiting for {what}; dead letters: {letters}\n{faults.describe_workers()}")
        time.sleep(0.01)
    return restarts


def completion_latencies(faults: Faults, runs: dict[str, tuple[Any, ...]], since: float) -> list[float]:
    return [next(e.time for _, e in faults.events(r) if isinstance(e, RunCompleted)) - since for r in runs]


def dead_letter_of(faults: Faults, run_id: str) -> dict[str, str] | None:
    return next((d for d in faults.dead_letters() if d.get("r") == run_id), None)


def test_r31_a_poison_run_is_dead_lettered_after_n_deliveries_and_redriven_after_a_fix(faults: Faults) -> None:
    args = ("--max-deliveries", str(N))
    faults.env["WF_FAULT_STEP_DELAY"] = "0.05"
    baseline = {f"baseline-{i}": (i,) for i in range(HEALTHY)}
    after = {f"after-{i}": (i,) for i in range(HEALTHY)}
    poisoned = {"poisoned": (7,)}
    references = [faults.reference(flows.healthy, {**baseline, **after}), faults.reference(flows.poisoned, poisoned)]
    faults.workers.start(*args)
    faults.workers.start(*args)

    started = time.time()
    faults.enqueue(flows.healthy, baseline.items())
    faults.wait_status(baseline)
    base_latency = completion_latencies(faults, baseline, started)

    faults.enqueue(flows.poisoned, poisoned.items())
    restarts = supervise(faults, lambda: dead_letter_of(faults, "poisoned"), "the poison message's dead letter", *args)
    letter = dead_letter_of(faults, "poisoned")
    assert letter is not None
    executions = len(faults.ledger("poison"))
    assert executions == N, f"the poison step ran {executions} times before its dead letter, not {N}"
    assert f"delivered {N} times" in letter["reason"], letter
    status_after_dead_letter = faults.status("poisoned")

    started = time.time()  # the workers go on serving as before
    faults.enqueue(flows.healthy, after.items())
    restarts += supervise(faults, lambda: {faults.status(r) for r in after} == {"completed"}, "healthy runs", *args)
    after_latency = completion_latencies(faults, after, started)

    # The fix: workers that no longer die on it; re-drive the dead letter from the command line.
    for proc in faults.workers.alive():
        faults.workers.kill(proc)
    faults.workers.start(*args, env={"WF_FAULT_POISON_FIXED": "1"})
    redrive = subprocess.run(
        [sys.executable, "-m", "werkfluss", "dead", "redrive", "--all"], cwd=ROOT, env=faults.env,
        capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert redrive.returncode == 0 and "re-driven (run" in redrive.stdout, redrive.stdout + redrive.stderr
    faults.wait_status(poisoned)
    expected = {**references[0].result(DEADLINE), **references[1].result(DEADLINE)}
    figures = faults.check(expected)
    report(
        f"R-31 poison run [{faults.kind}]",
        **figures,
        max_deliveries=N,
        poison_executions_before_dead_letter=executions,
        dead_letter_deliveries=int(letter["deliveries"]),
        dead_letter_reason=letter["reason"][:120],
        run_status_after_dead_letter=status_after_dead_letter,
        worker_restarts=restarts,
        healthy_latency_after_p50_p99=[pct(after_latency, 50), pct(after_latency, 99)],
        healthy_latency_baseline_p50_p99=[pct(base_latency, 50), pct(base_latency, 99)],
        resumed_after_fix=faults.status("poisoned") == "completed",
    )


def test_r31_healthy_runs_in_flight_beside_a_poison_run_are_not_dead_lettered(faults: Faults) -> None:
    # Each crash used to raise the delivery count of every message the dead worker held, and
    # XAUTOCLAIM handed them on together: neighbours were dead-lettered with the poison. Now a
    # redelivered message runs on probation, one at a time per worker, and a worker that dies
    # while one is on probation blames that one only.
    args = ("--max-deliveries", str(N))
    faults.env["WF_FAULT_STEP_DELAY"] = "0.05"  # healthy runs in flight when the poison kills their worker
    healthy = {f"healthy-{i}": (i,) for i in range(NEIGHBOURS)}
    reference = faults.reference(flows.healthy, healthy)
    faults.workers.start(*args)
    faults.workers.start(*args)
    faults.enqueue(flows.poisoned, [("poisoned", (7,))])
    faults.enqueue(flows.healthy, healthy.items())
    restarts = supervise(faults, lambda: dead_letter_of(faults, "poisoned"), "the poison message's dead letter", *args)
    restarts += supervise(faults, lambda: {faults.status(r) for r in healthy} == {"completed"}, "healthy runs", *args)
    collateral = sorted(d["r"] for d in faults.dead_letters() if d.get("r") in healthy)
    letter = dead_letter_of(faults, "poisoned")
    assert letter is not None
    executions = len(faults.ledger("poison"))
    figures = faults.check({**reference.result(DEADLINE), "poisoned": None}, statuses=("completed", "failed"))
    report(
        f"R-31 poison among {NEIGHBOURS} healthy runs in flight [{faults.kind}]",
        **figures,
        healthy_runs_dead_lettered=len(collateral),
        poison_executions_before_dead_letter=executions,
        dead_letter_deliveries=int(letter["deliveries"]),
        worker_restarts=restarts,
        examples=collateral[:5],
    )
    assert collateral == [], f"{len(collateral)} healthy runs were dead-lettered with the poison run"
    assert executions == N and f"delivered {N} times" in letter["reason"], (executions, letter)


@pytest.mark.parametrize("server", ["valkey"], indirect=True)
def test_r31_a_dead_lettered_run_is_marked_failed_with_the_reason(faults: Faults) -> None:
    args = ("--max-deliveries", "1")
    faults.workers.start(*args)
    faults.enqueue(flows.poisoned, [("poisoned", (7,))])
    supervise(faults, lambda: dead_letter_of(faults, "poisoned"), "the dead letter", *args, keep=1)
    # The worker that buried the message fails the run next (its own write, right after).
    wait_for(lambda: faults.status("poisoned") != "running", 15, "the dead-lettered run to be failed")
    assert faults.status("poisoned") == "failed"
    assert "deliver" in faults.error("poisoned")
