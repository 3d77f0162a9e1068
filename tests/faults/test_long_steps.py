"""R-16: a step that lasts three times the lease.

(a) With lease renewal on (the run's lease and the queue message's idle time, each renewed
every third of the lease), a second worker that polls for abandoned messages all along
never takes the run: the step executes once and the message's delivery count stays 1.

(b) The negative control: the worker holding the run renews nothing (``WF_FAULT_NO_RENEW=1``
makes `tests.faults.flows` replace both renewal loops in that process only). Its step is held
at a barrier until the second worker has claimed the message and started the step again,
then released: the documented window is real, the duplicate execution is visible in the
delivery count and the run's resumes, and the first worker's late completion is fenced.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from . import flows
from .harness import LEASE, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

STEP = 3 * LEASE


def delivery_counts(faults: Faults) -> dict[str, int]:
    """``{message ID: times delivered}`` of the queue's unacknowledged messages."""
    try:
        pending = faults.client.xpending_range(f"{faults.prefix}{{q}}:queue", "workers", "-", "+", 100)
    except Exception:  # no group yet
        return {}
    return {str(p["message_id"]): int(p["times_delivered"]) for p in pending}


def watch_until_completed(faults: Faults, run_id: str) -> int:
    """Wait for the run to complete, sampling the delivery count of its message; the highest seen."""
    highest = 0

    def done() -> bool:
        nonlocal highest
        highest = max([highest, *delivery_counts(faults).values()])
        return faults.status(run_id) == "completed"

    faults.wait(done, f"run {run_id} to complete", timeout=30 * LEASE)
    return highest


def step_executions(faults: Faults, key: str) -> list[int]:
    """The PIDs that started the step `key`, in order."""
    return [r.pid for r in faults.ledger("exec") if r.key == key]


def test_r16a_renewed_lease_covers_a_step_three_times_longer(faults: Faults) -> None:
    run_id, key = "long-a", "long-a:1"
    holder = faults.workers.start()
    faults.enqueue(flows.lengthy, [(run_id, (1, STEP))])
    faults.wait(lambda: step_executions(faults, key) != [], "the long step to start")
    thief = faults.workers.start()  # would claim the message as soon as it looked abandoned
    highest = watch_until_completed(faults, run_id)
    figures = faults.check({run_id: flows.expected_lengthy(1)})
    executions = step_executions(faults, key)
    resumes = faults.resumes(run_id)
    assert executions == [holder.pid], "the long step executed once, in its first worker"
    assert highest == 1, "renewals do not raise the delivery count"
    assert len(resumes) == 1, "nobody took the run over"
    assert thief.poll() is None
    fenced = [w for w in faults.writes() if w.outcome == "fenced"]
    assert fenced == []
    report(
        f"R-16a renewal on [{faults.kind}]",
        **figures,
        lease_s=LEASE,
        step_s=STEP,
        step_executions=len(executions),
        delivery_count_max=highest,
        resumes=len(resumes),
        step_s_measured=round(faults.ledger("long-done")[0].time - faults.ledger("exec")[0].time, 3),
    )


def test_r16b_without_renewal_the_long_step_executes_twice(faults: Faults) -> None:
    run_id, key = "long-b", "long-b:1"
    holder = faults.workers.start(env={"WF_FAULT_NO_RENEW": "1"})
    faults.arm("long", key)  # the first execution stays inside the step until released
    faults.enqueue(flows.lengthy, [(run_id, (2, STEP))])
    assert faults.wait_reached("long", key) == holder.pid
    stalled_at = time.time()
    thief = faults.workers.start()
    faults.wait(lambda: len(step_executions(faults, key)) >= 2, "a second worker to execute the step again")
    stolen_after = time.time() - stalled_at
    faults.release("long", key)
    highest = watch_until_completed(faults, run_id)
    faults.wait(lambda: any(r.key == key and r.pid == holder.pid for r in faults.ledger("long-done")),
                "the first worker to finish its copy of the step")  # fmt: skip
    # The first worker's completion is fenced: the run's log holds the thief's.
    faults.wait(lambda: [w.outcome for w in faults.writes(f"append@{run_id}#c1") if w.pid == holder.pid] == ["fenced"],
                "the first worker's late completion to be refused")  # fmt: skip
    figures = faults.check({run_id: flows.expected_lengthy(2)})
    executions = step_executions(faults, key)
    resumes = faults.resumes(run_id)
    assert executions == [holder.pid, thief.pid], "the documented window: the step executed twice"
    assert highest >= 2, "the redelivery is visible in the delivery count"
    assert len(resumes) >= 2 and str(thief.pid) in resumes[-1].holder
    report(
        f"R-16b renewal off [{faults.kind}]",
        **figures,
        lease_s=LEASE,
        step_executions=len(executions),
        delivery_count_max=highest,
        resumes=len(resumes),
        stall_to_second_execution_s=round(stolen_after, 3),
        late_completion="fenced",
    )
