"""R-17, R-18, R-19: hook deliveries early, twice (also with one delivery key), across a crash
and to finished runs.
R-21: a durable sleep that comes due while every worker is dead.

The hook workflow (`flows.approval`) runs a step, then awaits ``hook("approve:<n>")`` and
passes the payload to a last step; its result names the payload it got.
"""

from __future__ import annotations

import functools
import signal
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest

from werkfluss import (
    HookClosedError,
    WerkflussError,
    cancel_async,
    expire_hooks_async,
    invoke_hook_async,
    pending_hooks_async,
)
from werkfluss._events import HookReceived, RunCancelled, RunCompleted, RunResumed, StepCompleted, TimerStarted

from . import flows
from .harness import DEADLINE, TRIALS, pct, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def received(faults: Faults, run_id: str) -> list[HookReceived]:
    return [e for _, e in faults.events(run_id) if isinstance(e, HookReceived)]


def first_step_done(faults: Faults, run_id: str) -> float:
    return next(e.time for _, e in faults.events(run_id) if isinstance(e, StepCompleted) and e.seq == 1)


def box_length(faults: Faults, token: str) -> int:
    return int(faults.client.xlen(f"{faults.prefix}{{hook:{token}}}:box"))


# -- R-17 --------------------------------------------------------------------------------------------------------------


def test_r17_payloads_delivered_before_the_run_reaches_its_hook_are_kept(faults: Faults) -> None:
    per_variant = max(2, TRIALS // 2)
    variants: dict[str, list[int]] = {"before-run": [], "in-step": [], "parked": []}
    for i in range(3 * per_variant):
        variants[list(variants)[i % 3]].append(i)
    run_of = {n: f"hooked-{n}" for ns in variants.values() for n in ns}
    payload = {n: f"yes-{n}" for n in run_of}
    reference = faults.reference(
        flows.approval, {run_of[n]: (n,) for n in run_of}, hooks={flows.approval_token(n): payload[n] for n in run_of}
    )
    faults.workers.start()
    delivered: dict[int, float] = {}
    for n in variants["before-run"]:  # before the run even exists
        faults.invoke_hook(flows.approval_token(n), payload[n])
        delivered[n] = time.time()
    for n in variants["in-step"]:
        faults.arm("prepare", f"{run_of[n]}:1")
    faults.enqueue(flows.approval, [(run_of[n], (n,)) for n in run_of])
    for n in variants["in-step"]:  # while step 1 runs, before the run reaches the hook
        faults.wait_reached("prepare", f"{run_of[n]}:1")
        faults.invoke_hook(flows.approval_token(n), payload[n])
        delivered[n] = time.time()
        faults.release("prepare", f"{run_of[n]}:1")
    faults.wait_status([run_of[n] for n in variants["parked"]], ["paused"])
    for n in variants["parked"]:
        faults.invoke_hook(flows.approval_token(n), payload[n])
        delivered[n] = time.time()
    faults.wait_status(run_of.values())
    figures = faults.check(reference.result(DEADLINE))
    lost = [n for n in run_of if [e.n for e in received(faults, run_of[n])] != [1]]
    assert lost == [] and figures["wrong_results"] == 0
    never_paused = {n for n in run_of if not any(type(e).__name__ == "RunPaused" for _, e in faults.events(run_of[n]))}
    assert never_paused >= set(variants["before-run"]) | set(variants["in-step"]), "a waiting payload needs no pause"
    latency = {
        # from the run reaching the hook (step 1 recorded) to the payload taken
        "hook_reached_to_payload_taken": [
            received(faults, run_of[n])[0].time - first_step_done(faults, run_of[n])
            for n in variants["before-run"] + variants["in-step"]
        ],
        # from the delivery to the payload taken, for a run parked on the hook
        "delivery_to_resume_parked": [received(faults, run_of[n])[0].time - delivered[n] for n in variants["parked"]],
    }
    report(
        f"R-17 early deliveries [{faults.kind}]",
        **figures,
        deliveries=len(run_of),
        deliveries_lost=len(lost),
        **{f"{name}_p50_p99": [pct(values, 50), pct(values, 99)] for name, values in latency.items()},
    )


# -- R-18 --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["same", "distinct", "same-key"])
def test_r18_a_second_delivery_to_a_single_shot_hook_is_kept_never_overwrites(faults: Faults, second: str) -> None:
    runs = {f"twice-{n}": (n,) for n in range(max(2, TRIALS // 2))}
    first = {r: f"first-{args[0]}" for r, args in runs.items()}
    # "same-key": the sender retried with its delivery key (and another body): the retry stores nothing.
    again = {r: first[r] if second == "same" else f"second-{args[0]}" for r, args in runs.items()}
    key = {r: f"evt-{r}" if second == "same-key" else None for r in runs}
    stored: Counter[bool] = Counter()
    reference = faults.reference(
        flows.approval, runs, hooks={flows.approval_token(args[0]): first[r] for r, args in runs.items()}
    )
    worker = faults.workers.start()
    faults.enqueue(flows.approval, runs.items())
    faults.wait_status(runs, ["paused"])
    worker.send_signal(signal.SIGTERM)  # no worker while both arrive: the run is still parked for the second
    worker.wait(30)
    for run_id, (n,) in runs.items():
        for payload in (first[run_id], again[run_id]):
            send = functools.partial(invoke_hook_async, flows.approval_token(n), payload, key=key[run_id])
            stored[faults.call(functools.partial(send, settings=faults.settings))] += 1
    assert stored == ({True: len(runs), False: len(runs)} if second == "same-key" else {True: 2 * len(runs)})
    faults.workers.start()
    faults.wait_status(runs)
    figures = faults.check(reference.result(DEADLINE))
    consumptions = Counter(len(received(faults, r)) for r in runs)
    assert consumptions == {1: len(runs)}, "each single-shot hook took one payload"
    assert all(faults.result(r).endswith(f":{first[r]}") for r in runs), "the first delivery won"
    left = {r: box_length(faults, flows.approval_token(n)) for r, (n,) in runs.items()}
    kept = 0 if second == "same-key" else 1
    assert set(left.values()) == {kept}, "the second payload is kept in the mailbox, untouched (unless a retry)"
    pending = faults.call(lambda: pending_hooks_async(settings=faults.settings))
    assert {(h.token, h.payloads, h.owner) for h in pending} == {
        (flows.approval_token(n), 1, r) for r, (n,) in runs.items() if kept
    }
    report(
        f"R-18 second delivery {second} [{faults.kind}]",
        **figures,
        consumptions_per_hook=dict(consumptions),
        second_delivery=(
            "same delivery key: a no-op, invoke_hook returned False"
            if second == "same-key"
            else "kept in the mailbox for a later hook() of the run (documented)"
        ),
        deliveries_stored=dict(stored),
        mailbox_left=dict(Counter(left.values())),
    )


def test_r18_a_crash_between_recording_a_payload_and_removing_it_consumes_it_once(faults: Faults) -> None:
    runs = {f"hookcrash-{n}": (n,) for n in range(max(2, TRIALS // 2))}
    payload = {r: f"p-{args[0]}" for r, args in runs.items()}
    reference = faults.reference(
        flows.approval, runs, hooks={flows.approval_token(args[0]): payload[r] for r, args in runs.items()}
    )
    faults.workers.concurrency = max(faults.workers.concurrency, len(runs))  # every run stops in the victim
    victim = faults.victim()
    faults.enqueue(flows.approval, runs.items())
    faults.wait_status(runs, ["paused"])
    for run_id, (n,) in runs.items():  # HookReceived is recorded; the mailbox entry is not yet removed
        faults.arm("after-append", f"{run_id}#h2:1")
        faults.invoke_hook(flows.approval_token(n), payload[run_id])
    for run_id in runs:
        assert faults.wait_reached("after-append", f"{run_id}#h2:1") == victim.pid
    faults.workers.spawn()
    faults.workers.kill(victim)
    faults.wait_status(runs)
    figures = faults.check(reference.result(DEADLINE))
    consumptions = Counter(len(received(faults, r)) for r in runs)
    assert consumptions == {1: len(runs)}, "the payload was taken once, before and after the crash"
    report(f"R-18 crash mid-consumption [{faults.kind}]", **figures, consumptions_per_hook=dict(consumptions))


def test_r18_a_payload_consumed_before_a_crash_is_not_listed_as_pending(faults: Faults) -> None:
    run_id, n = "hookleak", 0
    victim = faults.victim()
    faults.enqueue(flows.approval, [(run_id, (n,))])
    faults.wait_status([run_id], ["paused"])
    faults.arm("after-append", f"{run_id}#h2:1")
    faults.invoke_hook(flows.approval_token(n), "taken")
    faults.wait_reached("after-append", f"{run_id}#h2:1")
    faults.workers.spawn()
    faults.workers.kill(victim)
    faults.wait_status([run_id])
    assert len(received(faults, run_id)) == 1
    assert box_length(faults, flows.approval_token(n)) == 0
    assert faults.call(lambda: pending_hooks_async(settings=faults.settings)) == []


# -- R-19 --------------------------------------------------------------------------------------------------------------


def snapshot(faults: Faults, run_id: str, token: str) -> dict[str, Any]:
    """What a delivery to `token` of finished run `run_id` must not change."""
    prefix = faults.prefix
    return {
        "keys": sorted(k.decode() for k in faults.client.scan_iter(f"{prefix}*") if b":ref:" not in k),
        "state": faults.state(run_id),
        "log": len(faults.events(run_id)),
        "box": box_length(faults, token),
        "timer": faults.client.zscore(f"{prefix}{{q}}:timers", run_id),
        "pending_hooks": faults.client.zscore(f"{prefix}hooks", token),
    }


def finished_runs(faults: Faults) -> dict[str, tuple[str, str]]:
    """A completed and a cancelled run of the hook workflow: ``{kind: (run ID, token)}``."""
    faults.workers.start()
    faults.enqueue(flows.approval, [("done", (1,)), ("called-off", (2,))])
    faults.wait_status(["done", "called-off"], ["paused"])
    faults.invoke_hook(flows.approval_token(1), "ok")
    assert faults.call(lambda: cancel_async("called-off", "no longer wanted", settings=faults.settings))
    faults.wait_status(["done"])
    faults.wait_status(["called-off"], ["cancelled"])
    # Everything the completion and the cancel set in motion is done: no message, no due wake-up.
    faults.wait(lambda: faults.pending_messages() == 0, "the queue to drain")
    return {"completed": ("done", flows.approval_token(1)), "cancelled": ("called-off", flows.approval_token(2))}


def test_r19_an_unclaimed_token_keeps_its_payload_listed_until_it_expires(faults: Faults) -> None:
    token = "nobody:claims-this"
    faults.invoke_hook(token, {"kept": True})
    pending = faults.call(lambda: pending_hooks_async(settings=faults.settings))
    assert [(h.token, h.payloads, h.owner) for h in pending] == [(token, 1, None)]
    assert faults.call(lambda: expire_hooks_async("1h", settings=faults.settings)) == []  # not old enough
    assert box_length(faults, token) == 1
    time.sleep(0.01)  # expire_hooks compares delivery times in ms: let one pass
    assert faults.call(lambda: expire_hooks_async(0, settings=faults.settings)) == [token]
    assert faults.call(lambda: pending_hooks_async(settings=faults.settings)) == []
    assert faults.client.exists(f"{faults.prefix}{{hook:{token}}}:box") == 0
    report(f"R-19 unclaimed token [{faults.kind}]", payloads_kept_until_expiry=1, expired=1)


def test_r19_a_delivery_to_a_finished_run_changes_none_of_its_state(faults: Faults) -> None:
    runs = finished_runs(faults)
    before = {kind: faults.state(run_id) for kind, (run_id, _) in runs.items()}
    logs = {kind: len(faults.events(run_id)) for kind, (run_id, _) in runs.items()}
    for _, token in runs.values():
        with pytest.raises(HookClosedError):
            faults.invoke_hook(token, "too late")
    timers = f"{faults.prefix}{{q}}:timers"
    faults.wait(
        lambda: (
            all(faults.client.zscore(timers, r) is None for r, _ in runs.values()) and not faults.pending_messages()
        ),
        "the wake-ups of the finished runs to be handled",
    )
    changed = [kind for kind, (run_id, _) in runs.items() if faults.state(run_id) != before[kind]]
    grown = [kind for kind, (run_id, _) in runs.items() if len(faults.events(run_id)) != logs[kind]]
    assert changed == [] and grown == [], "a finished run's state or log changed"
    events = [type(e) for _, e in faults.events("called-off")]
    assert events.count(RunCancelled) == 1 and RunResumed not in events[events.index(RunCancelled) :]
    assert [type(e) for _, e in faults.events("done")].count(RunCompleted) == 1
    report(f"R-19 delivery to finished runs: state [{faults.kind}]", state_changes=0, log_events_added=0)


def test_r19_a_delivery_to_a_finished_run_is_refused_and_creates_nothing(faults: Faults) -> None:
    runs = finished_runs(faults)
    for kind, (run_id, token) in runs.items():
        before = snapshot(faults, run_id, token)
        with pytest.raises(WerkflussError):
            faults.invoke_hook(token, "too late")
        assert snapshot(faults, run_id, token) == before, kind


# -- R-21 --------------------------------------------------------------------------------------------------------------

NAP = 2.5  # seconds of durable sleep (RELIABILITY.md: 30); longer than the workers' Settings.hold, so the run pauses
DOWN_PAST_DUE = 1.0  # the workers come back this long after the timers came due (RELIABILITY.md: 10 s)


def test_r21_a_timer_due_while_every_worker_is_dead_fires_once_on_restart(faults: Faults) -> None:
    runs = {f"napper-{n}": (n, NAP) for n in range(max(2, TRIALS // 2))}
    reference = faults.reference(flows.nap, runs)
    faults.workers.start()
    faults.workers.start()
    faults.enqueue(flows.nap, runs.items())
    faults.wait_status(runs, ["paused"])
    for proc in faults.workers.alive():
        faults.workers.kill(proc)
    due = max(next(e.due for _, e in faults.events(r) if isinstance(e, TimerStarted)) for r in runs)
    time.sleep(max(0.0, due + DOWN_PAST_DUE - time.time()))  # the fault: no worker while the timers come due
    assert Counter(faults.status(r) for r in runs) == {"paused": len(runs)}
    started = time.time()
    back = faults.workers.start()
    faults.wait_status(runs)
    figures = faults.check(reference.result(DEADLINE))
    fires = Counter(len(faults.resumes(r)) - 1 for r in runs)  # resumes after the first one from the queue
    assert fires == {1: len(runs)}, "each timer fired exactly once"
    late = [
        next(e.time for _, e in faults.events(r) if isinstance(e, RunResumed) and f"/{back.pid}/" in e.holder) - started
        for r in runs
    ]
    report(
        f"R-21 timer due while workers were dead [{faults.kind}]",
        **figures,
        sleep_s=NAP,
        workers_down_past_due_s=DOWN_PAST_DUE,
        fires_per_timer=dict(fires),
        worker_start_to_fire_p50_p99=[pct(late, 50), pct(late, 99)],  # includes the worker's own start-up
        executions=faults.executions_histogram(runs),
    )
