"""The DBOS Transact half of the side-by-side benchmarks, one measurement per process.

The werkfluss benchmarks (step_overhead.py, throughput.py) run this file as a
subprocess with the same Python, so that DBOS's process-wide singleton, threads
and SQLite connections never share a process with werkfluss. Each invocation
prints one JSON object on its last line of stdout.

DBOS runs as a Python user would pick it up: ``pip install dbos``, its default
SQLite system database (a file in a temp dir), default settings otherwise.

    python bench/dbos_side.py steps --db DIR --steps 1,10,100,1000
    python bench/dbos_side.py build --db DIR --k 10000      # K steps, then the process dies (os._exit)
    python bench/dbos_side.py recover --db DIR --k 10000    # DBOS.launch() recovers and replays that run
    python bench/dbos_side.py worker --db DIR --id worker-1 # serve the "bench" queue until SIGTERM
    python bench/dbos_side.py enqueue --db DIR --count 1000 # enqueue, wait for all, report times

Exit code 3 (and a message) when dbos is not importable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from typing import Any

try:
    from dbos import DBOS, DBOSClient, DBOSConfig, SetWorkflowID
except ImportError:  # pragma: no cover - depends on the bench environment
    print("dbos is not importable: pip install dbos (into the environment that runs the benchmarks)", file=sys.stderr)
    sys.exit(3)

from _common import parse_ints, runs_per_sample  # bench/ is on sys.path: run as bench/dbos_side.py

QUEUE = "bench"
CRASH_AT_END = False  # `build`: the process dies after the last step, the run left PENDING
FINISHED_AT = 0.0  # perf_counter() when a `chain` body last returned in this process


@DBOS.step()
async def noop(i: int) -> int:
    return i


@DBOS.workflow()
async def chain(n: int) -> int:
    total = 0
    for i in range(n):
        total += await noop(i)
    if CRASH_AT_END:
        os._exit(0)  # like SIGKILL: no cleanup, the workflow stays PENDING in the database
    global FINISHED_AT
    FINISHED_AT = time.perf_counter()
    return total


@DBOS.step()
async def add_one(x: int) -> int:
    return x + 1


@DBOS.step()
async def finished_at(x: int) -> float:
    return time.time()


@DBOS.workflow()
async def three(i: int) -> float:
    """The throughput workload: three trivial async steps; the last records when it ran."""
    x = await add_one(i)
    x = await add_one(x)
    return await finished_at(x)


def url(db: str) -> str:
    return f"sqlite:///{os.path.join(db, 'dbos.sqlite')}"


def launch(db: str, executor_id: str | None = None) -> None:
    config: DBOSConfig = {"name": "wfbench", "system_database_url": url(db), "log_level": "WARNING"}
    if executor_id is not None:
        config["executor_id"] = executor_id
    DBOS(config=config)
    DBOS.launch()


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


async def timed_chain(n: int) -> float:
    with SetWorkflowID(f"steps-{n}-{uuid.uuid4().hex}"):
        t0 = time.perf_counter()
        result = await chain(n)
        wall = time.perf_counter() - t0
    assert result == n * (n - 1) // 2
    return wall


async def steps_main(steps: list[int]) -> dict[str, Any]:
    for _ in range(3):  # warm-up
        await timed_chain(10)
    walls: dict[str, float] = {}
    for n in (0, *steps):
        runs = [await timed_chain(n) for _ in range(runs_per_sample(n))]
        walls[str(n)] = statistics.median(runs)
    return {"walls": walls}


def cmd_steps(args: argparse.Namespace) -> None:
    launch(args.db)
    try:
        emit(asyncio.run(steps_main(args.steps)))
    finally:
        DBOS.destroy()


def cmd_build(args: argparse.Namespace) -> None:
    global CRASH_AT_END
    launch(args.db)
    CRASH_AT_END = True
    t0 = time.perf_counter()

    async def run() -> None:
        with SetWorkflowID(f"replay-{args.k}"):
            await chain(args.k)

    print(f"building {args.k} steps", file=sys.stderr, flush=True)
    try:
        asyncio.run(run())
    finally:
        print(f"build did not crash after {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def cmd_recover(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    launch(args.db)  # finds the PENDING run of `build` and recovers it in a background thread
    launched = time.perf_counter()
    handle = DBOS.retrieve_workflow(f"replay-{args.k}")
    result = handle.get_result()  # polls the database: its return lags the body's end
    assert result == args.k * (args.k - 1) // 2, result
    # The recovered body ran in this process: FINISHED_AT is when it returned.
    emit({"launch_s": launched - t0, "recovered_s": FINISHED_AT - t0, "result_s": time.perf_counter() - t0})
    DBOS.destroy()


def cmd_worker(args: argparse.Namespace) -> None:
    launch(args.db, executor_id=args.id)
    DBOS.register_queue(QUEUE)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"dbos worker {args.id} serving", file=sys.stderr, flush=True)
    stop.wait()
    DBOS.destroy()


def cmd_enqueue(args: argparse.Namespace) -> None:
    client = DBOSClient(system_database_url=url(args.db))
    try:
        prefix = f"tp-{uuid.uuid4().hex[:8]}-"
        enqueued: dict[str, float] = {}
        t0 = time.time()
        for i in range(args.count):
            workflow_id = f"{prefix}{i}"
            enqueued[workflow_id] = time.time()
            client.enqueue({"workflow_name": "three", "queue_name": QUEUE, "workflow_id": workflow_id}, i)
        enqueue_s = time.time() - t0
        deadline = time.monotonic() + args.timeout
        while True:
            done = client.list_workflows(
                workflow_id_prefix=prefix, status="SUCCESS", load_input=False, load_output=False
            )
            if len(done) >= args.count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        finished = client.list_workflows(workflow_id_prefix=prefix, status="SUCCESS", load_input=False)
        emit({
            "count": args.count,
            "completed": len(finished),
            "enqueue_s": enqueue_s,
            "enqueued": [enqueued[s.workflow_id] for s in finished],
            "finished": [float(s.output) for s in finished],
        })  # fmt: skip
    finally:
        client.destroy()


def main() -> None:
    logging.getLogger("dbos").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("steps", "build", "recover", "worker", "enqueue"):
        sub = commands.add_parser(name)
        sub.add_argument("--db", required=True, help="directory of the SQLite system database")
        if name == "steps":
            sub.add_argument("--steps", type=parse_ints, default=[1, 10, 100, 1000])
        if name in ("build", "recover"):
            sub.add_argument("--k", type=int, required=True)
        if name == "worker":
            sub.add_argument("--id", required=True, help="executor ID")
        if name == "enqueue":
            sub.add_argument("--count", type=int, default=1000)
            sub.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    {"steps": cmd_steps, "build": cmd_build, "recover": cmd_recover, "worker": cmd_worker, "enqueue": cmd_enqueue}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
