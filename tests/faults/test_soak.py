"""R-36: a steady mix of steps, sleeps and hooks on two workers, watched for leaks.

Runs of `more_flows.mixed` (a step, a 0.3 s durable sleep that pauses the run, a hook, a
step) are kept at ``IN_FLIGHT`` at a time. Half get their hook payload at once (it waits
in the mailbox), half once they are parked on the hook (the delivery wakes them).

Every second the test samples each worker's RSS and open file descriptors (psutil), the
queue's pending entries list (PEL) and the runs each worker holds in memory (its probe
files: ``werkfluss._holder._live``). After a warm-up (the first fifth), descriptors other than sockets
must stay flat, sockets stay below what the worker's concurrency can use at once (the
connection pool keeps the connections of its busiest moment for a while), and the PEL
and live runs stay bounded by the workers' concurrency; once the load stops and the runs
drain, both go back to 0. The real soak also wants the FD peak of its second half within
a few of the first half's.

``WF_FAULT_SOAK=<seconds>`` runs the real soak (RELIABILITY.md: 2 h in CI, 24 h before a
release) and also bounds the RSS slope (``WF_FAULT_SOAK_RSS_SLOPE`` MB/h, default 5) after
the warm-up; give it 20 minutes at least: a worker's RSS climbs for its first 3-4 minutes
(35.8 to 38.0 MB), then stays flat (8 minutes, 26,815 runs: 0.1 and 1.1 MB/h after). By
default a ``WF_FAULT_SOAK_CI`` (15) second version runs, which reports the slope only:
a few seconds of allocator warm-up say nothing about an hourly trend.
"""

from __future__ import annotations

import functools
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import msgspec
import psutil
import pytest

from werkfluss import enqueue_async, invoke_hook_async

from . import more_flows
from .harness import DEADLINE, report

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .harness import Faults

SOAK = float(os.environ.get("WF_FAULT_SOAK", "0"))
DURATION = SOAK or float(os.environ.get("WF_FAULT_SOAK_CI", "15"))
RSS_SLOPE = float(os.environ.get("WF_FAULT_SOAK_RSS_SLOPE", "5"))  # MB/h, asserted in the real soak only
IN_FLIGHT = 40
CONCURRENCY = 32
WORKERS = 2
NAP = 0.3  # seconds: longer than the fault workers' hold (0.05 s), so every run pauses on it
SAMPLE = 1.0  # seconds between samples
# Sockets: a worker's connection pool grows to its peak of concurrent commands, at most two per
# run slot (the body's and its lease renewal's) and one per worker loop; it keeps them a while
# (a 4-minute soak: 21 to 35 FDs, back to 27). Any other descriptor (files, pipes) must stay flat.
SOCKET_CEILING = 2 * CONCURRENCY + 8
FILE_SLACK = 2  # descriptors other than sockets a worker may open past its warm-up
FD_SLACK = 4  # the real soak: sockets the second half's peak may add to the first half's

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(DURATION) + 180)]


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` points, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if spread == 0 else sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600


def live_runs(faults: Faults, pids: Iterable[int]) -> dict[int, int]:
    """Each worker's runs in memory, by its latest probe (see more_flows.py)."""
    found = {}
    for pid in pids:
        probe = faults.root / "probes" / str(pid)
        if probe.exists():
            found[pid] = int(probe.read_text().split()[0])
    return found


def descriptors(pid: int) -> tuple[int, int]:
    """The process's open sockets and other descriptors, from one listing of /proc/<pid>/fd."""
    sockets = others = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if target.startswith("socket:"):
            sockets += 1
        else:
            others += 1
    return sockets, others


def pipelined(faults: Faults, keys: list[str], field: str) -> list[bytes | None]:
    """`field` of each hash in `keys`, in one round trip."""
    pipe = faults.client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, field)
    return list(pipe.execute())


async def drive(faults: Faults, runs: list[tuple[str, int]], deliveries: list[tuple[str, str]]) -> None:
    """Enqueue ``(run ID, n)`` runs of `mixed` and deliver ``(token, payload)`` hooks, on one connection."""
    for run_id, m in runs:
        await enqueue_async(more_flows.mixed.options(settings=faults.settings, run_id=run_id), m, NAP)
    for token, payload in deliveries:
        await invoke_hook_async(token, payload, settings=faults.settings)


def test_r36_steady_mixed_load_leaks_no_fds_and_keeps_the_pel_bounded(faults: Faults) -> None:
    faults.workers.module = "tests.faults.more_flows"
    faults.workers.concurrency = CONCURRENCY
    procs = [faults.workers.start(env={"WF_FAULT_PROBE": str(SAMPLE / 2)}) for _ in range(WORKERS)]
    watched = {p.pid: psutil.Process(p.pid) for p in procs}
    idle_fds = {pid: p.num_fds() for pid, p in watched.items()}
    expected: dict[str, str] = {}
    waiting_hook: dict[str, int] = {}  # runs whose payload is sent once they are parked on the hook
    live: set[str] = set()
    samples: list[dict[str, Any]] = []
    began = time.monotonic()
    next_sample = began
    n = 0
    while time.monotonic() - began < DURATION:
        statuses = pipelined(faults, [faults.key(r, "state") for r in live], "status")
        live -= {r for r, status in zip(list(live), statuses, strict=True) if status == b"completed"}
        fresh = [n + i for i in range(IN_FLIGHT - len(live))]
        n += len(fresh)
        parked = pipelined(faults, [faults.key(r, "state") for r in waiting_hook], "waiting")
        woken = {r: m for (r, m), waits in zip(waiting_hook.items(), parked, strict=True) if waits and b"hook" in waits}
        deliveries = [(more_flows.soak_token(m), f"p{m}") for m in fresh if m % 2 == 0]
        deliveries += [(more_flows.soak_token(m), f"p{m}") for m in woken.values()]
        faults.call(functools.partial(drive, faults, [(f"soak-{m}", m) for m in fresh], deliveries))
        for m in fresh:
            run_id = f"soak-{m}"
            expected[run_id] = more_flows.expected_mixed(m, f"p{m}")
            live.add(run_id)
            if m % 2:
                waiting_hook[run_id] = m
        for run_id in woken:
            del waiting_hook[run_id]
        now = time.monotonic()
        if now >= next_sample:
            next_sample = now + SAMPLE
            samples.append({
                "t": now - began,
                "rss": {pid: p.memory_info().rss / 2**20 for pid, p in watched.items()},
                "fds": {pid: descriptors(pid) for pid in watched},
                "pel": faults.pending_messages(),
                "live": live_runs(faults, watched),
            })  # fmt: skip
        time.sleep(0.01)  # the load generator's pace, not a synchronisation: every wait above is a poll
    load_ended = time.monotonic()
    rest = [(more_flows.soak_token(m), f"p{m}") for m in waiting_hook.values()]
    faults.call(functools.partial(drive, faults, [], rest))
    faults.wait_status(expected, timeout=DEADLINE)
    drained = time.monotonic() - load_ended
    faults.wait(lambda: faults.pending_messages() == 0, "the PEL to empty")
    drained_at = time.time()
    probes = [faults.root / "probes" / str(pid) for pid in watched]
    faults.wait(
        lambda: all(p.stat().st_mtime > drained_at for p in probes) and set(live_runs(faults, watched).values()) == {0},
        "the workers to hold no run in memory",
    )
    assert all(p.poll() is None for p in procs), faults.describe_workers()

    steady = samples[len(samples) // 5 :]
    assert len(steady) >= 3, f"too few samples ({len(samples)}): raise WF_FAULT_SOAK_CI"
    per_worker: dict[str, dict[str, Any]] = defaultdict(dict)
    for pid in watched:
        fds = [sum(s["fds"][pid]) for s in steady]
        files = [s["fds"][pid][1] for s in steady]
        half = len(fds) // 2
        per_worker[str(pid)] = {
            "fds_idle": idle_fds[pid],
            "fds_peak_first_second_half": [max(fds[:half]), max(fds[half:])],
            "rss_mb_first_last": [round(samples[0]["rss"][pid], 1), round(samples[-1]["rss"][pid], 1)],
            "rss_slope_mb_per_h": round(slope_per_hour([(s["t"], s["rss"][pid]) for s in steady]), 1),
            "fds_min_max": [min(fds), max(fds)],
            "fds_after_drain": watched[pid].num_fds(),
            "sockets_max": max(s["fds"][pid][0] for s in steady),
            "other_fds_first_max": [files[0], max(files)],
            "live_runs_max": max(s["live"].get(pid, 0) for s in steady),
            "fds_series": [sum(s["fds"][pid]) for s in samples[:: max(1, len(samples) // 20)]],
            "rss_mb_series": [round(s["rss"][pid], 1) for s in samples[:: max(1, len(samples) // 20)]],
        }
    pel = [s["pel"] for s in steady]
    if len(expected) <= 5000:
        figures = faults.check(expected)
    else:  # the full checker reads every log: for a long soak, compare the results only
        ids = list(expected)
        got = [
            v
            for i in range(0, len(ids), 1000)
            for v in pipelined(faults, [faults.key(r, "state") for r in ids[i : i + 1000]], "result")
        ]
        wrong = [
            r for r, raw in zip(ids, got, strict=True) if raw is None or msgspec.msgpack.decode(raw) != expected[r]
        ]
        figures = {"runs": len(ids), "wrong_results": len(wrong), "invariants": "results only"}
        assert wrong == [], wrong[:10]
    report(
        f"R-36 soak {DURATION:g} s [{faults.kind}]",
        **figures,
        seconds=DURATION,
        runs_completed=len(expected),
        runs_per_s=round(len(expected) / DURATION, 1),
        in_flight=IN_FLIGHT,
        drain_s=round(drained, 3),
        pel_max=max(pel),
        workers=dict(per_worker),
        server_clients=len(faults.client.client_list()),
        redis_used_memory_mb=round(int(faults.client.info("memory")["used_memory"]) / 2**20, 1),
    )
    for worker, one in per_worker.items():
        first_files, most_files = one["other_fds_first_max"]
        assert most_files <= first_files + FILE_SLACK, f"worker {worker}: FDs other than sockets grew: {one}"
        assert one["sockets_max"] <= SOCKET_CEILING, f"worker {worker}: over {SOCKET_CEILING} connections: {one}"
        if SOAK:
            first, second = one["fds_peak_first_second_half"]
            assert second <= first + FD_SLACK, f"worker {worker}: open FDs still growing: peak {first}, then {second}"
        assert one["live_runs_max"] <= CONCURRENCY
        if SOAK:
            assert one["rss_slope_mb_per_h"] <= RSS_SLOPE, (
                f"worker {worker}: RSS grows {one['rss_slope_mb_per_h']} MB/h"
            )
    assert max(pel) <= WORKERS * CONCURRENCY, f"the PEL grew to {max(pel)}"
