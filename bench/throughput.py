"""Throughput: 1000 workflows x 3 steps, enqueued while 1 or 2 worker processes serve them,
werkfluss next to DBOS Transact.

Run from the repository root (see bench/README.md):

    python bench/throughput.py                      # 1 and 2 workers, 3 repetitions, DBOS if importable
    python bench/throughput.py --runs 300 --repeat 1 --no-dbos

werkfluss: ``werkfluss worker bench_flows`` processes on the embedded Valkey
server (a fresh key prefix per measurement); this process enqueues with
`enqueue_async`. DBOS: ``bench/dbos_side.py worker`` processes on one SQLite
file (a fresh one per measurement); a ``dbos_side.py enqueue`` process enqueues
with `DBOSClient`. Both workloads' last step returns the time it ran, and
the enqueuer notes the time just before each enqueue, so each run's
end-to-end latency comes from this machine's one clock.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_flows  # noqa: E402  (the workers import it by this name too)
from _common import Embedded, package_version, percentile, start_processes, stop_processes, worker_env  # noqa: E402
from tables import fmt, print_table  # noqa: E402

from werkfluss import Settings, enqueue_async  # noqa: E402
from werkfluss._store._open import close_stores, open_store  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

STEPS_PER_RUN = 3


@dataclass
class Sample:
    system: str
    workers: int
    runs: int
    completed: int
    wall: float  # first enqueue to last completion, seconds
    enqueue: float  # seconds the enqueuer took for all runs
    latencies: list[float]  # seconds, per completed run

    @property
    def per_second(self) -> float:
        return self.completed / self.wall if self.wall > 0 else float("nan")


def sample_from(
    system: str, workers: int, runs: int, enqueued: Sequence[float], finished: Sequence[float], enqueue_s: float
) -> Sample:
    latencies = [f - e for e, f in zip(enqueued, finished, strict=True)]
    wall = max(finished) - min(enqueued) if finished else float("nan")
    return Sample(system, workers, runs, len(finished), wall, enqueue_s, latencies)


# -- werkfluss -------------------------------------------------------------------------------------------------------


async def enqueue_and_wait(settings: Settings, runs: int, patience: float) -> tuple[list[float], list[float], float]:
    store = await open_store(settings)
    wf = bench_flows.three.options(settings=settings)
    ids, enqueued = [], []
    t0 = time.time()
    for i in range(runs):
        enqueued.append(time.time())
        ids.append(await enqueue_async(wf, i))
    enqueue_s = time.time() - t0
    # Every run is done once the queue has nothing undelivered and nothing unacknowledged:
    # a worker acknowledges a message when its run has ended.
    with anyio.move_on_after(patience):
        while await store.queue_depth("workers") != (0, 0):  # noqa: ASYNC110 - polling another process
            await anyio.sleep(0.02)
    pipe = store.client.pipeline(transaction=False)
    for run_id in ids:
        pipe.hmget(store.key(run_id, "state"), "status", "result")
    replies = await pipe.execute()
    pairs = [
        (e, float(msgspec.msgpack.decode(result)))
        for e, (status, result) in zip(enqueued, replies, strict=True)
        if status == b"completed"
    ]
    await close_stores()
    return [e for e, _ in pairs], [f for _, f in pairs], enqueue_s


def werkfluss_case(directory: Path, workers: int, runs: int, concurrency: int, logs: Path) -> Sample:
    prefix = f"wftp-{uuid.uuid4().hex[:8]}:"
    env = worker_env(directory, prefix)
    argv = [sys.executable, "-m", "werkfluss", "worker", "bench_flows", "--concurrency", str(concurrency),
            "--log-level", "WARNING"]  # fmt: skip
    procs = start_processes(argv, env, workers, "serving", logs)
    try:
        settings = Settings(directory=str(directory), prefix=prefix)
        enqueued, finished, enqueue_s = anyio.run(enqueue_and_wait, settings, runs, 600.0, backend="asyncio")
    finally:
        stop_processes(procs)
    return sample_from("werkfluss", workers, runs, enqueued, finished, enqueue_s)


# -- DBOS ------------------------------------------------------------------------------------------------------------


def dbos_case(workers: int, runs: int, logs: Path) -> Sample:
    db = Path(tempfile.mkdtemp(prefix="wfbench-dbos-"))
    side = [sys.executable, str(BENCH / "dbos_side.py")]
    try:
        # The first process creates the SQLite schema; the others find it.
        procs = start_processes([*side, "worker", "--db", str(db), "--id", "worker-0"], dict(os.environ), 1,
                                "serving", logs)  # fmt: skip
        try:
            for i in range(1, workers):
                procs += start_processes([*side, "worker", "--db", str(db), "--id", f"worker-{i}"], dict(os.environ),
                                         1, "serving", logs)  # fmt: skip
            out = subprocess.run([*side, "enqueue", "--db", str(db), "--count", str(runs)], capture_output=True,
                                 text=True, timeout=1800, check=True)  # fmt: skip
        finally:
            stop_processes(procs)
        got = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(db, ignore_errors=True)
    return sample_from("DBOS", workers, runs, got["enqueued"], got["finished"], got["enqueue_s"])


def dbos_available() -> bool:
    return importlib.util.find_spec("dbos") is not None


# -- report ----------------------------------------------------------------------------------------------------------


def report(samples: Sequence[Sample], runs: int, concurrency: int) -> None:
    rows = []
    medians: dict[tuple[str, int], float] = {}
    for system in ("werkfluss", "DBOS"):
        for workers in sorted({s.workers for s in samples}):
            mine = [s for s in samples if s.system == system and s.workers == workers]
            if not mine:
                continue
            rates = [s.per_second for s in mine]
            mid = statistics.median(rates)
            medians[(system, workers)] = mid
            p50 = statistics.median([percentile(s.latencies, 0.5) for s in mine]) * 1000
            p99 = statistics.median([percentile(s.latencies, 0.99) for s in mine]) * 1000
            incomplete = sum(s.runs - s.completed for s in mine)
            rows.append([
                system, str(workers), str(len(mine)), fmt(mid), f"{fmt(min(rates))} .. {fmt(max(rates))}",
                fmt(mid * STEPS_PER_RUN, 0), fmt(p50), fmt(p99), fmt(statistics.median([s.enqueue for s in mine]), 2),
                str(incomplete),
            ])  # fmt: skip
    print_table(
        f"Throughput: {runs} workflows x {STEPS_PER_RUN} steps, enqueued while the workers serve",
        [
            "system",
            "workers",
            "reps",
            "workflows/s",
            "min .. max",
            "steps/s",
            "p50 ms",
            "p99 ms",
            "enqueue s",
            "incomplete",
        ],
        rows,
        [
            "workflows/s: completed runs / (last run's end - first enqueue); medians over repetitions.",
            "p50/p99: end-to-end latency per run, from just before its enqueue call to its last step; medians of",
            "  the repetitions' percentiles. enqueue s: how long the enqueuer took for all runs (sequential calls).",
            f"werkfluss: `werkfluss worker bench_flows --concurrency {concurrency}` on the embedded Valkey",
            "  (appendfsync everysec). DBOS: `dbos_side.py worker` processes on one SQLite file, default settings",
            "  (queue polling interval 1 s), enqueued with DBOSClient.",
        ],
        left=2,
    )
    ratios = [
        [
            str(w),
            fmt(medians[("werkfluss", w)]),
            fmt(medians[("DBOS", w)]),
            f"{medians[('werkfluss', w)] / medians[('DBOS', w)]:.1f}x",
        ]
        for w in sorted({w for _, w in medians})
        if ("werkfluss", w) in medians and ("DBOS", w) in medians
    ]
    if ratios:
        print_table("werkfluss / DBOS, workflows per second", ["workers", "werkfluss", "DBOS", "ratio"], ratios, left=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="workflows per measurement (default 1000)")
    parser.add_argument("--workers", default="1,2", help="worker process counts (default 1,2)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="werkfluss runs per worker at once (default 32)")
    parser.add_argument("--no-dbos", action="store_true", help="skip DBOS")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.platform()}), "
        f"Python {platform.python_version()}, werkfluss {package_version('werkfluss')}, "
        f"redis-py {package_version('redis')}, hiredis {package_version('hiredis')}, dbos {package_version('dbos')}"
    )
    use_dbos = not args.no_dbos and dbos_available()
    if not args.no_dbos and not use_dbos:
        print("DBOS: not importable in this environment, so its rows are skipped (pip install dbos to add them)")
    server = Embedded("tp")
    directory = server.dir
    logs = Path(tempfile.mkdtemp(prefix="wfbench-tp-logs-"))
    samples: list[Sample] = []
    t0 = time.perf_counter()
    try:
        assert server.server is not None
        print(f"embedded server: pid {server.server.pid}, {directory}")
        for rep in range(args.repeat):
            for workers in counts:  # interleaved, so that noise on the shared cores hits both alike
                sample = werkfluss_case(directory, workers, args.runs, args.concurrency, logs)
                samples.append(sample)
                print(f"  rep {rep + 1}: werkfluss, {workers} worker(s): {sample.per_second:,.0f} workflows/s",
                      flush=True)  # fmt: skip
                if use_dbos:
                    sample = dbos_case(workers, args.runs, logs)
                    samples.append(sample)
                    print(f"  rep {rep + 1}: DBOS, {workers} worker(s): {sample.per_second:,.1f} workflows/s",
                          flush=True)  # fmt: skip
        report(samples, args.runs, args.concurrency)
    finally:
        server.close()
        shutil.rmtree(logs, ignore_errors=True)
    print(f"\ntotal time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
