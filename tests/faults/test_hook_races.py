"""R-20: a hook payload delivered while a step is in flight (vercel/workflow #2780, where
the delivery re-invoked the workflow and dispatched the running step a second time).

Two workflows (`tests.faults.flows`), each with a step of three leases:

- ``faults:hook-then-step``: a hook registered in a race it loses to a short sleep, then
  the long step, then the hook awaited again: the payload waits in the mailbox;
- ``faults:hook-races-step``: the hook and the long step in one race: the payload wins
  while the step runs, and the step is cancelled as the loser.

Each is run twice: once delivered mid-step with two workers serving (the delivery wakes
the run; the worker that reads the wake-up finds the run held and must leave it), and
once with the worker SIGKILLed right after it recorded the payload (``HookReceived``),
before the run goes on; a second worker resumes it. Either way the step executes once
and the hook is consumed once (one ``HookReceived``, an empty mailbox), the race killed
between ``HookReceived`` and ``RaceWon`` too: its replay lets the recorded hook win without
starting the step.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from werkfluss._events import HookReceived, RaceWon

from . import flows
from .harness import LEASE, report

if TYPE_CHECKING:
    from werkfluss import Workflow

    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

STEP = 3 * LEASE
FLOWS = {"faults:hook-then-step": flows.hook_then_step, "faults:hook-races-step": flows.hook_races_step}


def box_length(faults: Faults, token: str) -> int:
    return int(faults.client.xlen(f"{faults.prefix}{{hook:{token}}}:box"))


def deliver_mid_step(faults: Faults, flow: Workflow[..., str], run_id: str, n: int) -> float:
    """Enqueue the run, wait until its long step executes, deliver the payload; when it was delivered."""
    faults.enqueue(flow, [(run_id, (n, STEP))])
    faults.wait(lambda: any(r.key.startswith(f"{run_id}:") for r in faults.ledger("exec")), "the long step to start")
    faults.invoke_hook(flows.raced_token(n), f"yes-{n}")
    return time.time()


@pytest.mark.parametrize(
    ("name", "crash"),
    [
        ("faults:hook-then-step", False),
        ("faults:hook-then-step", True),
        ("faults:hook-races-step", False),
        # Was a strict xfail: killed between HookReceived and RaceWon, the replayed race started the
        # losing step again before the replayed hook won. Now a racer the log has the outcome of wins.
        ("faults:hook-races-step", True),
    ],
    ids=["hook-then-step-live", "hook-then-step-crash", "hook-races-step-live", "hook-races-step-crash"],
)
def test_r20_hook_during_an_in_flight_step_dispatches_it_once_and_is_consumed_once(
    faults: Faults, name: str, crash: bool
) -> None:
    flow = FLOWS[name]
    tag = f"{name.removeprefix('faults:')}-{'crash' if crash else 'live'}"
    run_id, n = tag, 1 if crash else 2
    faults.workers.start()
    if crash:
        # The worker that records the payload is SIGKILLed right after; another one resumes.
        # The hook is the run's first hook: HookReceived's dedup is h<seq>:1, its seq 1 here.
        faults.arm("after-append", f"{run_id}#h1:1")
    else:
        faults.workers.start()  # two serving: the wake-up the delivery causes may reach the other one
    delivered = deliver_mid_step(faults, flow, run_id, n)
    killed_at = None
    if crash:
        holder = faults.wait_reached("after-append", f"{run_id}#h1:1")
        faults.workers.spawn()
        killed_at = time.time()
        faults.kill_pid(holder)
    faults.wait_status([run_id])
    executed = [r.key for r in faults.ledger("exec") if r.key.startswith(f"{run_id}:")]
    long_key = executed[0]  # the long step executes before `conclude`
    # The step that loses the race is cancelled: executed, never completed.
    losers = [long_key] if name == "faults:hook-races-step" else []
    figures = faults.check({run_id: flows.expected_raced(name, n, f"yes-{n}")}, losers=losers)
    log = faults.events(run_id)
    consumed = [e for _, e in log if isinstance(e, HookReceived)]
    figures.update(
        long_step_executions=executed.count(long_key),
        hook_consumptions=len(consumed),
        mailbox_left=box_length(faults, flows.raced_token(n)),
        race_winners=[e.index for _, e in log if isinstance(e, RaceWon)],
        delivered_to_completed_s=round(log[-1][1].time - delivered, 3),
    )
    if killed_at is not None:
        resumed = [e for e in faults.resumes(run_id) if e.time >= killed_at]
        assert len(resumed) == 1
        figures["kill_to_resume_s"] = round(resumed[0].time - killed_at, 3)
    report(f"R-20 {tag} [{faults.kind}]", **figures)
    assert [e.seq for e in consumed] == [1], f"the hook was consumed {len(consumed)} times"
    assert figures["mailbox_left"] == 0, "the payload is still in the mailbox"
    assert figures["long_step_executions"] == 1, "the in-flight step was dispatched again"
