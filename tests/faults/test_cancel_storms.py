"""R-32: cancellation from another process, once and in a storm.

A run of `more_flows.cancellable` spends its first step (`canary`) sending SET/GET pairs
of unique keys through the worker's own connection pool, then would run `ship`. A cancel
must reach the step at once through anyio cancellation (within a third of the lease), the
run must become ``cancelled`` and `ship` must never start.

The storm: ``WF_FAULT_CANCEL_RUNS`` runs (default 200) in their canary step at once on two
workers, and ``WF_FAULT_CANCELS`` cancels (default 1,000) from another process, half of
them themselves cancelled after a random 0-2 ms (mid-command), while that process sends
canary pairs through the same pool. A reply delivered to the wrong request
(CVE-2023-28858/28859: a command cancelled mid-flight leaves its reply on a pooled
connection) shows as a GET answering another key's value, in the workers' steps (whose
calls the cancels interrupt) or in the cancelling process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from werkfluss._events import RunCancelled

from ..conftest import ROOT
from . import more_flows
from .harness import LEASE, pct, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RUNS = int(os.environ.get("WF_FAULT_CANCEL_RUNS", "200"))  # RELIABILITY.md: 1,000
CANCELS = int(os.environ.get("WF_FAULT_CANCELS", "1000"))  # RELIABILITY.md: 10,000
LONG = 10.0  # seconds the single run's step would take
STORM_STEP = 120.0  # seconds the storm's steps would take: only a cancel ends them

# The cancelling process: argv = runs (comma-separated), number of cancels. Prints its figures.
STORM = """
import json, random, sys, time
import anyio
from werkfluss import Settings, cancel_async
from werkfluss._store._open import close_stores, open_store

runs, count = sys.argv[1].split(","), int(sys.argv[2])
stats = {"cancels": 0, "interrupted": 0, "returned_true": 0, "returned_false": 0, "errors": 0,
         "canary_pairs": 0, "crosstalk": 0, "examples": [], "first_request": {}, "began": time.time()}

async def main():
    settings = Settings.from_env()
    store = await open_store(settings)  # the pool cancel_async uses too: same loop, same settings
    stop = anyio.Event()
    slots = anyio.Semaphore(100)

    async def canary(i):
        n = 0
        while not stop.is_set():
            name, value = f"{settings.prefix}canary:storm:{i}:{n}", f"storm/{i}/{n}"
            await store.client.set(name, value, ex=120)
            got = await store.client.get(name)
            got = got.decode() if isinstance(got, bytes) else got
            if got != value:
                stats["crosstalk"] += 1
                stats["examples"] = (stats["examples"] + [[value, str(got)]])[:5]
            n += 1
            stats["canary_pairs"] += 1

    async def one(run):
        async with slots:
            stats["cancels"] += 1
            limit = random.uniform(0, 0.002) if random.random() < 0.5 else None
            with anyio.move_on_after(limit) as scope:
                try:
                    done = await cancel_async(run, "storm", settings=settings)
                except Exception:
                    stats["errors"] += 1
                    return
                stats["returned_true" if done else "returned_false"] += 1
                if done:
                    stats["first_request"].setdefault(run, time.time())
            stats["interrupted"] += scope.cancelled_caught

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(canary, i)
        async with anyio.create_task_group() as storm:
            for k in range(count):
                storm.start_soon(one, random.choice(runs))
        stats["storm_s"] = time.time() - stats["began"]
        for run in runs:  # every run cancelled at least once, uninterrupted
            if await cancel_async(run, "storm", settings=settings):
                stats["first_request"].setdefault(run, time.time())
        stop.set()
    await close_stores()

anyio.run(main)
print(json.dumps(stats))
"""


def canary_rows(faults: Faults) -> dict[str, tuple[str, int, int]]:
    """Per run: how its canary step ended, its SET/GET pairs and its wrong replies."""
    return {r.key.rsplit(":", 1)[0]: (r.extra[0], int(r.extra[1]), int(r.extra[2])) for r in faults.ledger("canary")}


def later_steps(faults: Faults, run_ids: list[str]) -> int:
    """Executions of the step after the canary (seq 2): must be none."""
    wanted = {f"{r}:2" for r in run_ids}
    return sum(1 for r in faults.ledger("exec") if r.key in wanted)


def test_r32_a_run_cancelled_from_another_process_inside_a_long_step(faults: Faults) -> None:
    faults.workers.module = "tests.faults.more_flows"
    faults.workers.start()
    run_id = "cancel-me"
    faults.enqueue(more_flows.cancellable, [(run_id, (1, LONG, 0.01))])
    faults.wait(lambda: any(r.key == f"{run_id}:1" for r in faults.ledger("exec")), "the long step to start")
    sent = time.time()
    cli = subprocess.run(
        [sys.executable, "-m", "werkfluss", "runs", "cancel", run_id, "--reason", "no longer wanted"],
        cwd=ROOT, env=faults.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    returned = time.time()
    faults.wait_status([run_id], ["cancelled"], timeout=LONG)
    ended = next(e for _, e in faults.events(run_id) if isinstance(e, RunCancelled))
    step = canary_rows(faults)[run_id]
    assert step[0].startswith("cancelled"), f"the step was not cancelled: {step}"
    assert later_steps(faults, [run_id]) == 0
    assert ended.reason == "no longer wanted"
    took = ended.time - sent
    assert took < LONG / 2, "the step was not interrupted"
    report(
        f"R-32 cancel inside a {LONG:g} s step [{faults.kind}]",
        cli_output=cli.stdout.strip(),
        steps_started_after_cancel=0,
        step_ended=step[0],
        seconds_to_cancelled=round(took, 3),  # includes the CLI process's start (~1 s)
        seconds_from_cli_exit_to_cancelled=round(ended.time - returned, 3),
        lease_s=LEASE,
    )


def test_r32_a_cancel_storm_leaves_no_reply_on_the_wrong_request(faults: Faults) -> None:
    faults.workers.module = "tests.faults.more_flows"
    faults.workers.concurrency = -(-RUNS // 2)
    for _ in range(2):
        faults.workers.start()
    runs = [f"storm-{i}" for i in range(RUNS)]
    faults.enqueue(more_flows.cancellable, [(r, (i, STORM_STEP, 0.05)) for i, r in enumerate(runs)])
    wanted = {f"{r}:1" for r in runs}
    faults.wait(lambda: len(wanted & {r.key for r in faults.ledger("exec")}) == RUNS, "every canary step to run")
    started = time.time()
    storm = faults.python(STORM, ",".join(runs), str(CANCELS))
    out, err = storm.communicate(timeout=120)
    assert storm.returncode == 0, err
    stats = json.loads(out)
    faults.wait_status(runs, ["cancelled"])
    steps = canary_rows(faults)
    cancelled = {r: next(e.time for _, e in faults.events(r) if isinstance(e, RunCancelled)) for r in runs}
    # From the first cancel the server accepted for the run (True) to the run recorded cancelled.
    to_cancelled = [cancelled[r] - at for r, at in stats["first_request"].items()]
    worker_crosstalk = faults.ledger("crosstalk")
    endings = Counter(how for how, _, _ in steps.values())
    executions = Counter(r.key for r in faults.ledger("exec") if r.key in wanted)
    report(
        f"R-32 cancel storm [{faults.kind}]",
        runs=RUNS,
        cancels=stats["cancels"],
        cancels_interrupted_mid_call=stats["interrupted"],
        cancel_returned={"true": stats["returned_true"], "false": stats["returned_false"], "error": stats["errors"]},
        steps_started_after_cancel=later_steps(faults, runs),
        canary_steps_ended=dict(endings),
        canary_pairs_in_workers=sum(pairs for _, pairs, _ in steps.values()),
        canary_pairs_in_canceller=stats["canary_pairs"],
        crosstalk_replies=len(worker_crosstalk) + stats["crosstalk"],
        cancel_to_cancelled_p50_p99_max=[pct(to_cancelled, 50), pct(to_cancelled, 99), pct(to_cancelled, 100)],
        storm_s=round(stats["storm_s"], 3),
        canceller_start_to_all_cancelled_s=round(max(cancelled.values()) - started, 3),
        canary_step_executions=dict(Counter(executions.values())),
    )
    assert stats["crosstalk"] == 0 and worker_crosstalk == [], (stats["examples"], worker_crosstalk[:5])
    assert later_steps(faults, runs) == 0, "a step after the cancelled one started"
    assert stats["errors"] == 0
    assert set(steps) == set(runs) and all(how.startswith("cancelled") for how, _, _ in steps.values()), endings
