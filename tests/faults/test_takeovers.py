"""R-14: two processes contend for one run.

(a) Each run is enqueued twice, so the two workers get two messages for it, while two more
processes call `start()` on the same runs: four contenders per run. One `RunCompleted`,
one completion per step, and every caller gets the reference result.

(b) Worker A's event loop is blocked inside a step (a barrier that blocks the whole
process, like a CPU-bound step or a long GC pause) until its lease lapses; worker B claims
the run and finishes it. Released, A's step returns and A tries to record it: the epoch
fence must refuse that write, and A drops the run without raising into the workflow body
(whose ``except Exception`` logs anything it sees to the ledger).
"""

from __future__ import annotations

import json
import signal
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

import pytest

from werkfluss._events import RunCompleted

from . import flows
from .harness import DEADLINE, TRIALS, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CALLER = """
import asyncio, json, os, sys, time
from pathlib import Path
from werkfluss import Settings, start_async
from tests.faults import flows

async def main() -> None:
    settings = Settings.from_env()
    calls, go = json.loads(sys.argv[1]), Path(sys.argv[2])
    Path(f"{go}.{os.getpid()}").touch()  # ready: imported, about to start
    while not go.exists():
        time.sleep(0.002)
    results = await asyncio.gather(
        *(start_async(flows.order.options(settings=settings, run_id=run_id), n) for run_id, n in calls)
    )
    print(json.dumps(dict(zip([run_id for run_id, _ in calls], results))))

asyncio.run(main())
"""


def test_r14a_four_contenders_for_each_run_one_completion_and_one_result(faults: Faults) -> None:
    runs = max(4, TRIALS)
    calls = {f"contended-{i}": (i,) for i in range(runs)}
    reference = faults.reference(flows.order, calls)
    faults.env["WF_FAULT_STEP_DELAY"] = "0.1"  # a run takes >= 0.3 s: the contenders overlap
    workers = [faults.workers.start(), faults.workers.start()]
    go = faults.root / "go"
    callers = [
        faults.python(CALLER, json.dumps([[r, args[0]] for r, args in calls.items()]), str(go)) for _ in range(2)
    ]
    faults.wait(lambda: all(go.with_name(f"go.{c.pid}").exists() for c in callers), "the callers to be ready")
    # Only a run still pending is enqueued again, so the workers are stopped while both enqueues run: otherwise a
    # worker (or, on a loaded machine, a caller) may start a run in between, and it gets one message, not two.
    queue = f"{faults.prefix}{{q}}:queue"
    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    try:
        faults.enqueue(flows.order, calls.items())
        faults.enqueue(flows.order, calls.items())
        queued = faults.client.xlen(queue)  # nothing is acknowledged (deleted) while the workers are stopped
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGCONT)
    go.touch()  # all four contenders at once
    assert queued == 2 * runs, "two queue messages per run"
    outputs = []
    for caller in callers:
        out, err = caller.communicate(timeout=DEADLINE)
        assert caller.returncode == 0, err
        outputs.append(json.loads(out))
    expected = reference.result(DEADLINE)
    assert outputs == [expected, expected], "every caller got the reference result"
    # Acknowledged means deleted; a worker that found a run busy acknowledged its message and set a timer to look
    # again, whose message comes later: the figures are read once all of that is done.
    faults.wait(
        lambda: faults.client.xlen(queue) == 0 and faults.client.zcard(f"{faults.prefix}{{q}}:timers") == 0,
        "every queue message and timer to be handled",
    )
    figures = faults.check(expected)
    completions = Counter(sum(isinstance(e, RunCompleted) for _, e in faults.events(r)) for r in calls)
    assert completions == {1: runs}
    by_key: dict[str, set[int]] = defaultdict(set)
    for row in faults.ledger("exec"):
        by_key[row.key].add(row.pid)
    executors = Counter(pid for pids in by_key.values() for pid in pids)
    holders = Counter(e.holder.split("/")[1] for r in calls for e in faults.resumes(r))
    report(
        f"R-14a contended runs [{faults.kind}]",
        **figures,
        contenders_per_run=4,
        run_completions_per_run=dict(completions),
        steps_executed_by_two_processes=sum(1 for pids in by_key.values() if len(pids) > 1),
        steps_executed_per_process=sorted(executors.values()),
        takeovers_per_process=sorted(holders.values()),
        fenced_writes=sum(1 for w in faults.writes() if w.outcome == "fenced"),
    )


def test_r14b_a_stalled_holder_is_fenced_out_and_user_code_sees_nothing(faults: Faults) -> None:
    rounds = max(1, TRIALS // 5)
    calls = {f"stalled-{i}": (i,) for i in range(rounds)}
    reference = faults.reference(flows.contested, calls)
    outcomes: Counter[str] = Counter()
    for run_id, args in calls.items():
        for proc in faults.workers.alive()[1:]:  # one worker: the run must start in it
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        stalled = faults.victim()
        key = f"{run_id}:2"
        faults.arm("stall", key)
        faults.enqueue(flows.contested, [(run_id, args)])
        assert faults.wait_reached("stall", key) == stalled.pid
        taker = faults.workers.start()
        faults.wait_status([run_id])  # the taker claimed the run after A's lease lapsed, and finished it
        faults.release("stall", key)
        target = f"append@{run_id}#c2"

        def answered(target: str = target, pid: int = stalled.pid) -> bool:
            return any(w.outcome is not None for w in faults.writes(target) if w.pid == pid)

        faults.wait(answered, "the stalled worker's late completion to be answered")
        late = [w for w in faults.writes(target) if w.pid == stalled.pid]
        taken = [w for w in faults.writes(target) if w.pid == taker.pid]
        assert [w.outcome for w in taken] == ["ok"] and int(taken[0].reply or 0) > 0, "the taker's write landed"
        assert all(w.outcome in ("fenced", "cancelled") for w in late), late
        outcomes.update(w.outcome or "" for w in late)
        assert stalled.poll() is None, "the fenced-out worker survived"
        assert Counter(r.pid for r in faults.ledger("exec") if r.key == key) == {stalled.pid: 1, taker.pid: 1}
    caught = faults.ledger("caught")
    assert caught == [], f"werkfluss's unwinding reached user code: {caught}"
    figures = faults.check(reference.result(DEADLINE))
    report(
        f"R-14b stalled holder [{faults.kind}]",
        **figures,
        rounds=rounds,
        late_completions_refused=dict(outcomes),  # fenced: the server said no; cancelled: lease loss noticed first
        late_completions_recorded=0,
        exceptions_seen_by_user_code=len(caught),
        run_completions=[sum(isinstance(e, RunCompleted) for _, e in faults.events(r)) for r in calls],
    )
