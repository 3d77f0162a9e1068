"""R-05: SIGTERM a worker while one of its runs is inside a long step.

The lease is 10 s here (werkfluss's default), so that "another worker resumes at once,
without waiting for the lease" is measurable: a hand-over that sat out the lease would
take 10 s. Two variants:

- the step ends within the grace period (2 s step, ``--grace 10``): the worker lets it
  finish, records it, hands the run back at the step boundary and exits; the step
  executed once;
- it does not (a step held at a barrier, ``--grace 2``): after the grace the worker
  cancels the step, hands the run back and exits; the step executes again elsewhere.

In both, the worker takes no new work after the signal, and another worker resumes the
run as soon as it is handed back.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import pytest

from . import flows
from .harness import make_faults, report

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from ..conftest import Server
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LEASE = 10.0


@pytest.fixture
def world(server: Server, prefix: str, tmp_path: Path) -> Iterator[Faults]:
    faults = make_faults(server, prefix, tmp_path / "faults", lease=LEASE)
    yield faults
    faults.close()


@pytest.mark.parametrize(
    ("variant", "grace", "seconds"), [("finishes", 10.0, 2.0), ("released", 2.0, 0.2)], ids=["finishes", "released"]
)
def test_r05_sigterm_hands_the_run_over_without_waiting_for_the_lease(
    world: Faults, variant: str, grace: float, seconds: float
) -> None:
    faults = world
    run_id, key = f"term-{variant}", f"term-{variant}:1"
    stopping = faults.workers.start("--grace", str(grace))
    if variant == "released":
        faults.arm("long", key)  # the step outlasts the grace: it waits here until cancelled
    faults.enqueue(flows.lengthy, [(run_id, (5, seconds))])
    faults.wait(lambda: [r.pid for r in faults.ledger("exec") if r.key == key] == [stopping.pid], "the step to start")
    other = faults.workers.start()
    signalled = time.time()
    stopping.send_signal(signal.SIGTERM)
    # New work after the signal goes to the other worker only.
    later = {f"term-{variant}-later-{i}": (i, 0.0) for i in range(3)}
    faults.enqueue(flows.lengthy, later.items())
    code = stopping.wait(grace + 10)
    exited = time.time()
    faults.wait_status([run_id, *later])
    figures = faults.check(
        {run_id: flows.expected_lengthy(5), **{r: flows.expected_lengthy(args[0]) for r, args in later.items()}}
    )
    executions = [r.pid for r in faults.ledger("exec") if r.key == key]
    resumed = [e for e in faults.resumes(run_id) if e.time >= signalled]
    assert len(resumed) == 1 and f"/{other.pid}/" in resumed[0].holder, "the other worker resumed the run"
    took_new = [r for r in faults.ledger("exec") if r.pid == stopping.pid and r.time >= signalled]
    assert took_new == [], "the stopping worker took no work after SIGTERM"
    assert code == 0, faults.workers.log(stopping)
    if variant == "finishes":
        assert executions == [stopping.pid], "the step finished in the stopping worker and ran once"
        boundary = next(r.time for r in faults.ledger("long-done") if r.pid == stopping.pid)
    else:
        assert executions == [stopping.pid, other.pid], "the cancelled step executed again in the other worker"
        assert exited - signalled < grace + 5, "the worker stopped within the grace period (and a margin)"
        boundary = signalled + grace  # the step is cancelled and the run handed back when the grace ends
    handover = resumed[0].time - boundary
    assert handover < LEASE / 2, "the other worker resumed at once, not after the lease"
    report(
        f"R-05 SIGTERM, step {variant} within the grace [{faults.kind}]",
        **figures,
        lease_s=LEASE,
        grace_s=grace,
        step_executions=len(executions),
        sigterm_to_exit_s=round(exited - signalled, 3),
        sigterm_to_resume_elsewhere_s=round(resumed[0].time - signalled, 3),
        hand_back_to_resume_s=round(handover, 3),
        exit_code=code,
    )
