"""R-01, R-02, R-03: worker processes SIGKILLed at precise points of a run.

Each trial stops a run at a barrier inside a worker, SIGKILLs that worker there, and lets
a freshly started worker claim the run after the lease. `BATCH` runs stop in the same
worker before each kill, so `TRIALS` runs per point cost `TRIALS / BATCH` kills.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest

from werkfluss._events import RunCompleted, RunResumed

from . import flows
from .harness import BATCH, DEADLINE, TRIALS, pct, report

if TYPE_CHECKING:
    from collections.abc import Callable

    from werkfluss import Workflow

    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120 + 8 * TRIALS)]


def kill_rounds(
    faults: Faults,
    tag: str,
    point: str,
    key_of: Callable[[str], str],
    flow: Workflow[..., Any] = flows.order,
    args_of: Callable[[int], tuple[Any, ...]] = lambda i: (i,),
) -> dict[str, Any]:
    """Run `TRIALS` runs of `flow`, each stopped at ``point@key_of(run)`` inside a worker that
    is then SIGKILLed (`BATCH` runs per kill); a new worker finishes them. Checks the
    invariants and returns the figures, with per-run latencies after the kill."""
    calls = {f"{tag}-{i}": args_of(i) for i in range(TRIALS)}
    reference = faults.reference(flow, calls)
    run_ids = list(calls)
    killed_at: dict[str, float] = {}
    kills = 0
    acked: list[float] = []
    for first in range(0, len(run_ids), BATCH):
        batch = run_ids[first : first + BATCH]
        victim = faults.victim()
        for run_id in batch:
            faults.arm(point, key_of(run_id))
        faults.enqueue(flow, [(r, calls[r]) for r in batch])
        holders = {faults.wait_reached(point, key_of(r)) for r in batch}
        assert holders == {victim.pid}, "every run of the batch stops in the one live worker"
        faults.workers.spawn()  # the replacement starts while the dead worker's lease runs out
        now = time.time()
        faults.workers.kill(victim)
        kills += 1
        killed_at.update(dict.fromkeys(batch, now))
        faults.wait_status(batch)
        faults.wait(lambda: faults.pending_messages() == 0, "the batch's queue messages to be acknowledged")
        acked.append(time.time() - now)
    figures = faults.check(reference.result(DEADLINE))
    after_kill: dict[str, list[float]] = {"resume": [], "completion": []}
    for run_id in run_ids:
        for _, event in faults.events(run_id):
            if event.time >= killed_at[run_id] and isinstance(event, RunResumed | RunCompleted):
                after_kill["resume" if isinstance(event, RunResumed) else "completion"].append(
                    event.time - killed_at[run_id]
                )
    latencies = {f"kill_to_{what}_p50_p99": [pct(values, 50), pct(values, 99)] for what, values in after_kill.items()}
    return {
        "trials": len(run_ids),
        "kills": kills,
        **figures,
        "executions": faults.executions_histogram(run_ids),
        **{name: value for name, value in latencies.items() if value[0] is not None},
        "kill_to_ack_p50_p99": [pct(acked, 50), pct(acked, 99)],
    }


@pytest.mark.parametrize("point", ["before-effect", "after-effect"])
def test_r01_sigkill_inside_step_2_loses_nothing_and_applies_its_effect_once(faults: Faults, point: str) -> None:
    figures = kill_rounds(faults, "r01", point, key_of=lambda run_id: f"{run_id}:2")
    executions = figures["executions"]
    assert executions["faults:reserve"] == {1: TRIALS}, "step 1 ran exactly once"
    assert executions["faults:ship"] == {1: TRIALS}, "step 3 ran exactly once"
    assert set(executions["faults:charge"]) <= {1, 2}, "step 2 ran at most once per kill + 1"
    assert executions["faults:charge"].get(2, 0) == TRIALS, "the killed attempt of step 2 did execute"
    attempts = Counter(r.key for r in faults.ledger("effect"))
    # Before the effect: the killed attempt never reached it. After: it did, and the sink dropped the repeat.
    assert set(attempts.values()) == {1 if point == "before-effect" else 2}
    assert figures["duplicate_effects"] == 0
    report(f"R-01 {point} [{faults.kind}]", **figures, effect_attempts=dict(Counter(attempts.values())))


def test_r02_sigkill_between_steps_never_runs_a_completed_step_again(faults: Faults) -> None:
    figures = kill_rounds(faults, "r02", "between", key_of=lambda run_id: run_id)
    executions = figures["executions"]
    re_executed = sum(n for count, n in executions["faults:reserve"].items() if count > 1)
    assert re_executed == 0, "a completed step executed again"
    assert executions["faults:charge"] == {1: TRIALS} and executions["faults:ship"] == {1: TRIALS}
    report(f"R-02 [{faults.kind}]", **figures, re_executions_of_completed_steps=re_executed)


@pytest.mark.parametrize(
    ("point", "flow", "key_suffix"),
    [
        ("after-append", "order", "#c2"),  # step 2's completion is committed; the process dies before using it
        ("after-finish", "order", ""),  # the run's end is committed; the queue message is not yet acknowledged
        ("after-pause", "nap", ""),  # two-phase: the run is parked, its timer entry is not yet set
    ],
    ids=["after-append", "after-finish", "after-pause"],
)
def test_r03_sigkill_after_a_commit_before_the_ack_replays_and_sees_the_work_done(
    faults: Faults, point: str, flow: str, key_suffix: str
) -> None:
    workflow = flows.order if flow == "order" else flows.nap
    args_of = (lambda i: (i,)) if flow == "order" else (lambda i: (i, 0.5))
    figures = kill_rounds(faults, f"r03{point}", point, lambda r: r + key_suffix, workflow, args_of)
    run_ids = [f"r03{point}-{i}" for i in range(TRIALS)]
    completions = Counter(type(e).__name__ for r in run_ids for _, e in faults.events(r) if isinstance(e, RunCompleted))
    assert completions == {"RunCompleted": TRIALS}
    assert all(set(counts) == {1} for counts in figures["executions"].values()), "no committed step ran again"
    # Replays after the kill: the redelivered message resumes the run (or, when its end was
    # recorded, finds it complete and only acknowledges the message).
    replays = Counter(len(faults.resumes(r)) - 1 for r in run_ids)
    if point == "after-finish":
        assert replays == {0: TRIALS}
    report(f"R-03 {point} [{faults.kind}]", **figures, extra_replays_per_run=dict(replays))
