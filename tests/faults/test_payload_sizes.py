"""R-29: arguments and results from 1 KiB to the limit (1 MiB, `Settings.max_payload`), and over it.

Under the limit, a run of `more_flows.payload` passes its argument to a step that returns it:
the run's argument, the step's argument and the step's result all have that size. Each
size runs alone in one worker; figures: the run's latency, the worker's RSS after it, and
the server memory the run's keys take (``MEMORY USAGE``).

Over it (1 MiB, whose encoding is a few bytes longer; 16 and 64 MiB with
``WF_FAULT_PAYLOAD_HUGE=1``), `PayloadTooLargeError` comes before the value is written:
an enqueue creates no key, a hook delivery no mailbox, a step's argument made in the body
fails the run before the step runs, and a step's result fails the step (a final
`StepFailed` of a few hundred bytes, not the value).

Then a fan-out: ``WF_FAULT_FANOUT`` (default 100; RELIABILITY.md: 1,000) steps gathered at
once, each returning 100 KiB.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from werkfluss import PayloadTooLargeError, Settings, invoke_hook_async
from werkfluss._events import RunCompleted, RunFailed, RunResumed, StepCompleted, StepFailed

from . import more_flows
from .harness import report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KIB, MIB = 1 << 10, 1 << 20
LIMIT = Settings().max_payload
FITS = [KIB, 64 * KIB, LIMIT - 64]  # the last: the largest blob whose encoding fits
TOO_LARGE = [MIB] + ([16 * MIB, 64 * MIB] if os.environ.get("WF_FAULT_PAYLOAD_HUGE") == "1" else [])
FANOUT = int(os.environ.get("WF_FAULT_FANOUT", "100"))
CHUNK = 100 * KIB


def run_memory(faults: Faults, run_id: str) -> int:
    """Bytes the server spends on the run's keys."""
    keys = faults.client.keys(f"{faults.prefix}{{{run_id}}}:*")
    return sum(int(faults.client.memory_usage(k, samples=0) or 0) for k in keys)


def rss_mb(pid: int) -> float:
    return round(float(psutil.Process(pid).memory_info().rss) / MIB, 1)


def seconds(faults: Faults, run_id: str) -> float:
    """From the worker taking the run to its end, by the log."""
    events = [e for _, e in faults.events(run_id)]
    taken = next(e.time for e in events if isinstance(e, RunResumed))
    return round(events[-1].time - taken, 3)


def test_r29_payloads_up_to_the_limit_work_and_larger_ones_are_refused_before_any_write(faults: Faults) -> None:
    faults.workers.module = "tests.faults.more_flows"
    worker = faults.workers.start()
    by_size: dict[str, dict[str, Any]] = {"idle": {"worker_rss_mb": rss_mb(worker.pid)}}
    for size in FITS:
        run_id, blob = f"size-{size}", os.urandom(size)
        started = time.monotonic()
        faults.enqueue(more_flows.payload, [(run_id, (blob,))])
        faults.wait_status([run_id])
        wall = time.monotonic() - started
        assert faults.result(run_id) == hashlib.sha256(blob).hexdigest()
        completed = next(e for _, e in faults.events(run_id) if isinstance(e, StepCompleted))
        assert bytes(completed.result)[-size:] == blob, "the step's result was stored whole"
        by_size[f"{size} B"] = {
            "enqueue_to_completed_s": round(wall, 3),
            "run_s": seconds(faults, run_id),
            "worker_rss_mb": rss_mb(worker.pid),
            "redis_bytes_per_run": run_memory(faults, run_id),
        }

    refused: dict[str, dict[str, str]] = {}
    for size in TOO_LARGE:
        outcome: dict[str, str] = {}
        run_id, blob = f"too-large-{size}", b"x" * size
        queue = faults.client.xlen(f"{faults.prefix}{{q}}:queue")
        with pytest.raises(PayloadTooLargeError) as raised:
            faults.enqueue(more_flows.payload, [(run_id, (blob,))])
        assert faults.client.keys(f"{faults.prefix}{{{run_id}}}*") == [], "an enqueue over the limit wrote keys"
        assert faults.client.xlen(f"{faults.prefix}{{q}}:queue") == queue
        outcome["enqueue"] = str(raised.value)[:160]
        token = f"too-large:{size}"
        with pytest.raises(PayloadTooLargeError):
            faults.call(functools.partial(invoke_hook_async, token, blob, settings=faults.settings))
        assert faults.client.keys(f"{faults.prefix}{{hook:{token}}}*") == [], "a delivery over the limit wrote keys"
        outcome["hook"] = "refused, no mailbox"

        made = {f"made-{where}-{size}": (size, where) for where in ("argument", "result")}
        faults.enqueue(more_flows.payload_made, made.items())
        faults.wait_status(made, ["failed"])
        for run_id, (_, where) in made.items():
            events = [e for _, e in faults.events(run_id)]
            ran = [r for r in faults.ledger("exec") if r.key == f"{run_id}:1"]
            failed = [e for e in events if isinstance(e, StepFailed)]
            ended = events[-1]
            assert isinstance(ended, RunFailed)
            assert not any(isinstance(e, StepCompleted) for e in events)
            if where == "argument":  # refused before the step ran or anything of it was recorded
                assert ran == [] and failed == [], (ran, failed)
                assert ended.error.type.endswith("PayloadTooLargeError"), ended.error
            else:  # the step ran; its result is refused, finally, not retried
                assert len(ran) == 1 and len(failed) == 1 and failed[0].final, (ran, failed)
                assert failed[0].error.type.endswith("PayloadTooLargeError"), failed[0].error
            assert run_memory(faults, run_id) < 64 * KIB, "the value over the limit reached the server"
            outcome[f"step {where}"] = ended.error.message[:160]
        refused[f"{size} B"] = outcome

    fan = f"fan-out-{FANOUT}"
    started = time.monotonic()
    faults.enqueue(more_flows.fan_out, [(fan, (FANOUT, CHUNK))])
    faults.wait_status([fan], timeout=60 + FANOUT / 10)
    assert faults.result(fan) == more_flows.expected_fan_out(FANOUT, CHUNK)
    assert sum(isinstance(e, StepCompleted) for _, e in faults.events(fan)) == FANOUT
    assert isinstance(faults.events(fan)[-1][1], RunCompleted)
    report(
        f"R-29 payload sizes [{faults.kind}]",
        limit_bytes=LIMIT,
        fits=by_size,
        over_the_limit_refused_before_any_write=refused,
        limit_enforced="yes",
        fan_out={
            "steps": FANOUT,
            "result_bytes_each": CHUNK,
            "enqueue_to_completed_s": round(time.monotonic() - started, 3),
            "run_s": seconds(faults, fan),
            "worker_rss_mb": rss_mb(worker.pid),
            "redis_bytes": run_memory(faults, fan),
        },
    )
