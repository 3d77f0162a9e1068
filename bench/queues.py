"""Queues and flow control (issue 16): what admission costs, whether keys take turns, how exact a
rate is, and the commands one queue's slot takes per workflow on a Redis Cluster.

Run from the repository root (see bench/README.md):

    python bench/queues.py                          # every part: about 5 minutes on 2 cores
    python bench/queues.py --only overhead,rate --repeat 1

Parts (``--only``):

- ``overhead``: workflows/s of a one-step workflow on the default queue (no limits, straight to
  the stream), on a queue with a concurrency limit only, and on one with every limit on
  (concurrency, per_key, rate, key_rate, priority; none binding), 1 and 2 worker processes, side
  by side in each repetition. The workers are SIGSTOPped while the runs are enqueued and
  SIGCONTed at once: the figure is how fast they drain a backlog, not how fast one enqueuer goes.
- ``fairness``: 10,000 runs of key A enqueued, then 10 of key B, on a queue with ``per_key=2``;
  start delay (the step's start minus just before its enqueue) per key.
- ``rate``: 1,000 runs on a queue with ``rate="50/s"``: the most starts in any 1 s window, and
  the throughput against 50/s.
- ``cluster``: a local 3-master Redis Cluster (tests/servers.py `RedisCluster3`, Debian's
  redis-server). The queue's slot is on a master that holds nothing else of the bench (run IDs
  and the prefix's keys are picked to hash elsewhere), so that master's ``INFO commandstats``
  (after ``CONFIG RESETSTAT``) and CPU time (psutil) are the queue's alone: per workflow, and
  next to a PING on the same node.

Workers are ``python bench/queue_flows.py CONCURRENCY QUEUE`` processes (a `Worker` serving that
queue only) on one embedded Valkey server (``appendfsync everysec``), a fresh key prefix per
measurement; the cluster part runs its worker in this process.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import queue_flows  # noqa: E402  (the workers define the same workflows, by name)
from _common import Embedded, package_version, percentile, start_processes, stop_processes  # noqa: E402
from tables import fmt, print_table  # noqa: E402

from werkfluss import Settings, Worker, enqueue_async  # noqa: E402
from werkfluss._store._open import close_stores, open_store  # noqa: E402

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Sequence

    from werkfluss import Workflow

ENQUEUERS = 8  # concurrent enqueue_async callers
KEYS = 50  # keys the limited runs of the overhead part spread over

VARIANTS: dict[str, tuple[Workflow[[int], float], str]] = {
    "plain (default queue)": (queue_flows.plain, "default"),
    "concurrency only": (queue_flows.conc, "bench-conc"),
    "all limits": (queue_flows.limited, "bench-limits"),
}


# -- shared pieces ---------------------------------------------------------------------------------------------------


def options_for(flow: Workflow[[int], float], settings: Settings, i: int) -> Any:
    """The options a run of the overhead part is enqueued with: a key and a priority where the queue has limits."""
    queue = flow.queue
    if queue.priority:
        return flow.options(settings=settings, key=f"k{i % KEYS}", priority=i % 10)
    if queue.per_key or queue.key_rate:
        return flow.options(settings=settings, key=f"k{i % KEYS}")
    return flow.options(settings=settings)


async def enqueue_all(
    count: int,
    make: Callable[[int], Any],
    *,
    callers: int = ENQUEUERS,
    run_ids: Sequence[str] | None = None,
    offset: int = 0,
) -> tuple[list[str], list[float]]:
    """Enqueue runs ``0 .. count-1`` (``make(i)`` gives the options, ``i + offset`` is the argument)
    from `callers` concurrent tasks; returns their IDs and the time just before each enqueue call."""
    ids = [""] * count
    noted = [0.0] * count
    cursor = iter(range(count))

    async def caller() -> None:
        for i in cursor:
            options = make(i)
            if run_ids is not None:
                options = options.options(run_id=run_ids[i])
            noted[i] = time.time()
            ids[i] = await enqueue_async(options, i + offset)

    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(caller)
    return ids, noted


async def wait_done(settings: Settings, ids: Sequence[str], patience: float) -> dict[str, float]:
    """Poll until every run completed (or `patience` s passed); returns each completed run's result
    (the time its step started). The poll asks only about runs not yet done, every 0.2 s."""
    store = await open_store(settings)
    left, results = list(ids), {}
    deadline = time.monotonic() + patience
    while left and time.monotonic() < deadline:
        pipe = store.client.pipeline(transaction=False)
        for run_id in left:
            pipe.hmget(store.key(run_id, "state"), "status", "result")
        replies = await pipe.execute()
        still = []
        for run_id, (status, result) in zip(left, replies, strict=True):
            if status == b"completed":
                results[run_id] = float(msgspec.msgpack.decode(result))
            elif status in (b"failed", b"blocked", b"cancelled"):
                raise RuntimeError(f"run {run_id} ended {status.decode()}")
            else:
                still.append(run_id)
        left = still
        if left:
            await anyio.sleep(0.2)
    return results


def workers(env: dict[str, str], count: int, queue: str, concurrency: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    argv = [sys.executable, str(BENCH / "queue_flows.py"), str(concurrency), queue]
    return start_processes(argv, env, count, "serving", logs)


def signal_all(procs: Sequence[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    for proc in procs:
        os.kill(proc.pid, sig)


def mid(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def span(values: Sequence[float], digits: int = 1) -> str:
    return f"{fmt(min(values), digits)} .. {fmt(max(values), digits)}" if values else "-"


async def ping_rtt(settings: Settings, calls: int = 2000) -> float:
    """The median PING round trip through the store's own redis-py client, in µs."""
    store = await open_store(settings)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        await store.client.ping()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


# -- (a) overhead ----------------------------------------------------------------------------------------------------


@dataclass
class Drain:
    variant: str
    workers: int
    runs: int
    completed: int
    wall: float  # SIGCONT to the last run's step start, seconds
    enqueue: float  # seconds to enqueue them all (ENQUEUERS callers)
    worker_cpu: float  # seconds of the workers' CPU (user + system) from SIGCONT until all completed
    server_cpu: float  # the same of the server's

    @property
    def per_second(self) -> float:
        return self.completed / self.wall if self.wall > 0 else float("nan")


def overhead_case(server: Embedded, variant: str, count: int, runs: int, concurrency: int, logs: Path) -> Drain:
    flow, queue = VARIANTS[variant]
    prefix = f"wfq-{uuid.uuid4().hex[:8]}:"
    procs = workers(server.env() | {"WERKFLUSS_PREFIX": prefix}, count, queue, concurrency, logs)
    settings = Settings(directory=str(server.dir), prefix=prefix)
    assert server.server is not None
    server_pid = server.server.pid

    async def main() -> Drain:
        try:
            signal_all(procs, signal.SIGSTOP)
            t = time.perf_counter()
            ids, _ = await enqueue_all(runs, lambda i: options_for(flow, settings, i))
            enqueue_s = time.perf_counter() - t
            cpu = [cpu_seconds(p.pid) for p in procs], cpu_seconds(server_pid)
            began = time.time()
            signal_all(procs, signal.SIGCONT)
            results = await wait_done(settings, ids, 300)
            worker_cpu = sum(cpu_seconds(p.pid) - before for p, before in zip(procs, cpu[0], strict=True))
            server_cpu = cpu_seconds(server_pid) - cpu[1]
            wall = max(results.values()) - began if results else float("nan")
            return Drain(variant, count, runs, len(results), wall, enqueue_s, worker_cpu, server_cpu)
        finally:
            signal_all([p for p in procs if p.poll() is None], signal.SIGCONT)
            await close_stores()

    try:
        return anyio.run(main, backend="asyncio")
    finally:
        stop_processes(procs)


def overhead(server: Embedded, args: argparse.Namespace, logs: Path) -> None:
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    samples: list[Drain] = []
    for rep in range(args.repeat):
        for count in counts:
            for variant in VARIANTS:  # interleaved, so that the shared cores' noise hits all alike
                sample = overhead_case(server, variant, count, args.runs, args.concurrency, logs)
                samples.append(sample)
                print(
                    f"  rep {rep + 1}: {variant}, {count} worker(s): {sample.per_second:,.0f} workflows/s", flush=True
                )
    rtt = anyio.run(lambda: _rtt(server), backend="asyncio")
    rows = []
    for count in counts:
        base = mid([s.per_second for s in samples if s.workers == count and s.variant == "plain (default queue)"])
        for variant in VARIANTS:
            mine = [s for s in samples if s.workers == count and s.variant == variant]
            rates = [s.per_second for s in mine]
            rate = mid(rates)
            rows.append([
                variant, str(count), str(len(mine)), fmt(rate, 0), span(rates, 0),
                f"{(1 - rate / base) * 100:+.1f} %" if variant != "plain (default queue)" else "",
                fmt(1e6 / rate / rtt, 1) if rate else "-",
                fmt(mid([s.worker_cpu / s.runs * 1e6 for s in mine]), 0),
                fmt(mid([s.server_cpu / s.runs * 1e6 for s in mine]), 0),
                fmt(mid([s.runs / s.enqueue for s in mine]), 0), str(sum(s.runs - s.completed for s in mine)),
            ])  # fmt: skip
    print_table(
        f"(a) Overhead: {args.runs} one-step workflows drained by W workers (--concurrency {args.concurrency} each)",
        [
            "queue",
            "workers",
            "reps",
            "workflows/s",
            "min .. max",
            "slower",
            "RTTs/wf",
            "worker CPU us/wf",
            "server CPU us/wf",
            "enqueue/s",
            "incomplete",
        ],
        rows,
        [
            "workflows/s: completed runs / (SIGCONT of the workers -> the last run's step start); medians over reps.",
            "  The runs are enqueued while the workers are SIGSTOPped, so the figure is the workers' drain rate.",
            "slower: against the plain queue with the same workers (target for 'all limits': <= 15 %).",
            f"RTTs/wf: 1 / (workflows/s) in PING round trips (redis-py, this process): {rtt:.0f} us.",
            "CPU us/wf: user + system CPU (psutil) of all the worker processes, and of the server, from SIGCONT until",
            "  every run completed, per workflow: less at the mercy of other load on the machine than workflows/s.",
            "all limits: Queue(concurrency=10000, per_key=1000, rate='50000/s', key_rate='50000/s', priority=True),",
            f"  runs spread over {KEYS} keys and priorities 0-9; none of the limits binds at these rates.",
            f"enqueue/s: enqueue_async calls per second from {ENQUEUERS} concurrent callers in one process.",
        ],
        left=1,
    )


async def _rtt(server: Embedded) -> float:
    try:
        return await ping_rtt(server.settings)
    finally:
        await close_stores()


# -- (b) fairness ----------------------------------------------------------------------------------------------------


async def fairness_case(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    flow = queue_flows.fair_one
    try:
        store = await open_store(settings)
        began = time.perf_counter()
        a_ids, a_at = await enqueue_all(args.fair_a, lambda i: flow.options(settings=settings, key="A"))
        a_enqueue = time.perf_counter() - began
        waiting = int(await store.client.zcard(store.queue_key("k:A", queue_flows.fair.tags()[0])))
        # B's arguments differ from A's: the same call would reach the same run (its ID derives from them).
        b = lambda i: flow.options(settings=settings, key="B")  # noqa: E731
        b_ids, b_at = await enqueue_all(args.fair_b, b, callers=1, offset=args.fair_a)
        results = await wait_done(settings, a_ids + b_ids, args.patience)
        return {"a": (a_ids, a_at), "b": (b_ids, b_at), "results": results, "waiting": waiting, "a_enqueue": a_enqueue}
    finally:
        await close_stores()


def fairness(server: Embedded, args: argparse.Namespace, logs: Path) -> None:
    rows = []
    for rep in range(args.fair_repeat):
        prefix = f"wfqf-{uuid.uuid4().hex[:8]}:"
        procs = workers(server.env() | {"WERKFLUSS_PREFIX": prefix}, 2, "bench-fair", args.concurrency, logs)
        settings = Settings(directory=str(server.dir), prefix=prefix)
        try:
            got = anyio.run(fairness_case, settings, args, backend="asyncio")
        finally:
            stop_processes(procs)
        results: dict[str, float] = got["results"]
        for key in ("a", "b"):
            ids, at = got[key]
            delays = [results[r] - t for r, t in zip(ids, at, strict=True) if r in results]
            starts = sorted(results[r] for r in ids if r in results)
            rate = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else float("nan")
            rows.append([
                str(rep + 1), key.upper(), f"{len(delays)} / {len(ids)}", fmt(percentile(delays, 0.5) * 1000, 0),
                fmt(percentile(delays, 0.99) * 1000, 0), fmt(max(delays) * 1000, 0), fmt(rate, 0),
                str(got["waiting"]) if key == "b" else fmt(got["a_enqueue"], 1),
            ])  # fmt: skip
        print(f"  rep {rep + 1}: fairness done", flush=True)
    print_table(
        f"(b) Fairness: {args.fair_a:,} runs of key A enqueued, then {args.fair_b} of key B; Queue(per_key=2)",
        ["rep", "key", "started", "p50 ms", "p99 ms", "max ms", "starts/s", "A waiting / enqueue s"],
        rows,
        [
            "start delay: the run's step start minus just before its enqueue_async call (one clock).",
            f"2 workers (--concurrency {args.concurrency} each). A's runs: {ENQUEUERS} concurrent enqueue callers,",
            "  B's one after another once all of A's are in; per_key=2 lets 2 runs of a key execute at once.",
            "last column: for A, seconds its enqueue took; for B, A's runs still waiting when B's first was enqueued.",
        ],
        left=2,
    )


# -- (c) rate --------------------------------------------------------------------------------------------------------


def most_in_window(starts: Sequence[float], window: float) -> int:
    """The most starts in any window of `window` seconds ([t, t + window))."""
    ordered, best, j = sorted(starts), 0, 0
    for i in range(len(ordered)):
        while ordered[i] - ordered[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


async def rate_case(settings: Settings, args: argparse.Namespace) -> tuple[list[float], list[float], list[float]]:
    """The runs' step starts, their enqueue times, and the admissions the server counted (its
    rate window's entries, server ms / 1000, collected every 0.1 s: each stays there a window)."""
    try:
        store = await open_store(settings)
        window = store.queue_key("rate", queue_flows.rated.tags()[0])
        admitted: dict[bytes, float] = {}
        done = anyio.Event()

        async def watch() -> None:
            while not done.is_set():
                for member, score in await store.client.zrange(window, 0, -1, withscores=True):
                    admitted[member] = score / 1000
                with anyio.move_on_after(0.1):
                    await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            ids, at = await enqueue_all(args.rate_runs, lambda i: queue_flows.rated_one.options(settings=settings))
            results = await wait_done(settings, ids, args.patience)
            done.set()
        return [results[r] for r in ids if r in results], at, sorted(admitted.values())
    finally:
        await close_stores()


def rate(server: Embedded, args: argparse.Namespace, logs: Path) -> None:
    rows = []
    limit = queue_flows.rated.config()
    per, window = int(limit["rate"]), int(limit["window"]) / 1000
    for rep in range(args.rate_repeat):
        prefix = f"wfqr-{uuid.uuid4().hex[:8]}:"
        procs = workers(server.env() | {"WERKFLUSS_PREFIX": prefix}, 2, "bench-rate", args.concurrency, logs)
        settings = Settings(directory=str(server.dir), prefix=prefix)
        try:
            starts, enqueued, admitted = anyio.run(rate_case, settings, args, backend="asyncio")
        finally:
            stop_processes(procs)
        starts.sort()
        duration = starts[-1] - starts[0]
        overall = (len(starts) - 1) / duration
        sustained = (len(starts) - per) / duration  # after the first window's burst of `per`
        seconds: dict[int, int] = {}
        for t in starts:
            seconds[int(t - starts[0])] = seconds.get(int(t - starts[0]), 0) + 1
        full = [n for s, n in seconds.items() if 0 < s < max(seconds)]
        rows.append([
            str(rep + 1), f"{len(starts)} / {args.rate_runs}", f"{len(admitted)}: {most_in_window(admitted, window)}",
            str(most_in_window(starts, window)),
            str(most_in_window(starts, window * 1.05)), f"{min(full)} .. {max(full)}" if full else "-",
            fmt(overall, 2), f"{(overall / (per / window) - 1) * 100:+.1f} %", fmt(sustained, 2),
            f"{(sustained / (per / window) - 1) * 100:+.1f} %", fmt(duration, 1),
            fmt((starts[0] - min(enqueued)) * 1000, 0),
        ])  # fmt: skip
        print(f"  rep {rep + 1}: rate done: {overall:.2f}/s", flush=True)
    print_table(
        f"(c) Rate: {args.rate_runs} runs on Queue(rate='{per}/{'s' if window == 1 else f'{window:g}s'}'), 2 workers",
        [
            "rep",
            "started",
            "admitted: max in 1 s",
            "starts: max in 1 s",
            "max in 1.05 s",
            "per second",
            "overall/s",
            "vs limit",
            "sustained/s",
            "vs limit",
            "seconds",
            "first ms",
        ],
        rows,
        [
            "admitted: the admissions the server counted (its rate window's entries, on its clock, collected every",
            "  0.1 s), and the most of them in any sliding 1 s window: what the limit holds exactly.",
            "starts: the most step starts in any sliding 1 s window; a step starts some ms after its admission (the",
            "  worker takes up to its free slots at once and starts them one by one), so starts bunch up.",
            "per second: starts in each whole second after the first start (the first and last partial ones left out).",
            "overall/s: (starts - 1) / (last start - first start). sustained/s: (starts - limit) / the same: a sliding",
            "  window admits a first burst of `limit` at once, then one as each start leaves the window.",
            "first ms: the first start after the first enqueue.",
        ],
        left=1,
    )


# -- (d) the cluster -------------------------------------------------------------------------------------------------

SLOT_BOUNDS = (0, 5461, 10923, 16384)  # RedisCluster3 gives node i the slots bounds[i] .. bounds[i + 1] - 1


def node_of(key: str) -> int:
    from redis.crc import key_slot

    slot = key_slot(key.encode())
    return next(i for i in range(3) if SLOT_BOUNDS[i] <= slot < SLOT_BOUNDS[i + 1])


@dataclass
class NodeCount:
    commands: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0  # seconds of the node process's CPU (user + system)


def commandstats(client: Any) -> dict[str, int]:
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def cluster(args: argparse.Namespace) -> None:
    if shutil.which("redis-server") is None:
        print("cluster: redis-server is not installed, so the cluster part is skipped (apt-get install redis-server)")
        return
    try:
        import psutil  # noqa: F401
    except ImportError:
        print("cluster: psutil is not importable, so the cluster part is skipped (pip install psutil)")
        return
    sys.path.insert(0, str(ROOT))
    from tests.servers import RedisCluster3

    # The bench's nodes keep nothing on disk, on purpose: the store's warning about it says nothing here.
    warnings.filterwarnings("ignore", message=".*has no persistence")
    directory = Path(tempfile.mkdtemp(prefix="wfbench-cluster-"))
    nodes = RedisCluster3(directory)
    try:
        print(f"cluster: masters on ports {nodes.ports} (pids {[n.pid for n in nodes.nodes]})", flush=True)
        cluster_parts(nodes, args)
    finally:
        nodes.stop()
        shutil.rmtree(directory, ignore_errors=True)


def cluster_parts(nodes: Any, args: argparse.Namespace) -> None:
    clients = [node.client(decode_responses=True) for node in nodes.nodes]
    pids = [node.pid for node in nodes.nodes]
    rng = random.Random(16)
    home = {"plain (default queue)": node_of("x{q}:queue"), "all limits": node_of("x{q:bench-limits}:queue")}
    assert len(set(home.values())) == 2, home
    elsewhere = ({0, 1, 2} - set(home.values())).pop()  # runs and the prefix's own keys go there
    rows: list[list[str]] = []
    figures: dict[str, list[dict[str, float]]] = {v: [] for v in home}
    pings: list[float] = []
    detail: dict[str, dict[str, int]] = {}
    try:
        for rep in range(args.repeat):
            for variant, queue_node in home.items():
                while True:  # a prefix whose own keys (Pruns, Pqueues) live with the runs, off the queue's master
                    prefix = f"wfqc-{rng.getrandbits(32):08x}:"
                    if {node_of(prefix + "runs"), node_of(prefix + "queues")} == {elsewhere}:
                        break
                run_ids: list[str] = []
                while len(run_ids) < args.cluster_runs:
                    candidate = f"c{rep}-{rng.getrandbits(40):010x}"
                    if node_of(f"x{{{candidate}}}:state") == elsewhere:
                        run_ids.append(candidate)
                got = anyio.run(
                    one_cluster_case, nodes.url, prefix, variant, run_ids, clients, pids, queue_node, args.idle,
                    backend="asyncio",
                )  # fmt: skip
                figures[variant].append(got)
                detail[variant] = got["commands"]  # type: ignore[assignment]
                print(f"  rep {rep + 1}: cluster, {variant}: {got['per_wf']:.1f} commands/wf on its slot", flush=True)
            pings.append(ping_cost(clients[home["all limits"]], pids[home["all limits"]]))
    finally:
        for client in clients:
            client.close()
    ping_us = mid(pings)
    for variant, samples in figures.items():
        per_wf = mid([s["per_wf"] for s in samples])
        cpu_us = mid([s["cpu_us"] for s in samples])
        rows.append([
            variant, f"node {home[variant]}", str(len(samples)), fmt(mid([s["scripts"] for s in samples]), 2),
            fmt(per_wf, 1), fmt(mid([s["others_per_wf"] for s in samples]), 1), fmt(cpu_us, 0),
            fmt(cpu_us / ping_us, 1), fmt(1e6 / cpu_us, 0), fmt(mid([s["idle_per_s"] for s in samples]), 1),
            fmt(mid([s["rate"] for s in samples]), 0),
        ])  # fmt: skip
    print_table(
        f"(d) A 3-master Redis Cluster: what one queue's slot takes per workflow ({args.cluster_runs} one-step runs)",
        [
            "queue",
            "slot on",
            "reps",
            "scripts/wf",
            "cmds/wf",
            "cmds/wf elsewhere",
            "CPU us/wf",
            "PINGs",
            "ceiling wf/s",
            "idle cmds/s",
            "wf/s here",
        ],
        rows,
        [
            "The queue's master holds nothing else of the bench: run IDs and the prefix's keys hash to another node.",
            "scripts/wf: EVALSHA/EVAL calls on the queue's master per workflow; cmds/wf: every command it executed",
            "  (INFO commandstats after CONFIG RESETSTAT, inner commands of scripts included; INFO/CONFIG left out),",
            "  enqueue included; cmds/wf elsewhere: the same on the master of the runs' own keys.",
            "CPU us/wf: the queue master's process CPU (user + system, psutil) per workflow, idle loops included;",
            f"  PINGs: that in PINGs on the same master ({ping_us:.1f} us of its CPU per PING from one client, 20,000",
            "  PINGs, less its idle CPU over as long);",
            "  ceiling wf/s: 1e6 / CPU us/wf, what one master could admit if the queue's slot had the node to itself.",
            "idle cmds/s: what the worker's loops send the queue's slot while it has no work (one worker; subtract",
            "  it for more workers). wf/s here: one in-process worker with this process enqueuing, not a ceiling.",
        ],
        left=2,
    )
    for variant, commands in detail.items():
        top = sorted(commands.items(), key=lambda kv: -kv[1])[:12]
        runs = args.cluster_runs
        print(f"  {variant}, last rep, per workflow: " + ", ".join(f"{k} {v / runs:.2f}" for k, v in top))


async def one_cluster_case(
    url: str, prefix: str, variant: str, run_ids: list[str], clients: list[Any], pids: list[int], node: int,
    idle: float,
) -> dict[str, Any]:  # fmt: skip
    flow, queue = VARIANTS[variant]
    settings = Settings(redis_url=url, prefix=prefix)
    client, pid = clients[node], pids[node]
    other = clients[node_of(f"x{{{run_ids[0]}}}:state")]
    try:
        async with Worker(settings=settings, queues=[queue]):
            await anyio.sleep(1.0)  # its loops settle into their idle rhythm
            client.config_resetstat()
            await anyio.sleep(idle)
            idle_calls = sum(v for k, v in commandstats(client).items() if k not in ("info", "config|resetstat"))
            client.config_resetstat()
            other.config_resetstat()
            cpu = cpu_seconds(pid)
            began = time.perf_counter()
            ids, _ = await enqueue_all(len(run_ids), lambda i: options_for(flow, settings, i), run_ids=run_ids)
            results = await wait_done(settings, ids, 300)
            took = time.perf_counter() - began
            used = cpu_seconds(pid) - cpu
            commands = {k: v for k, v in commandstats(client).items() if not k.startswith(("info", "config"))}
            elsewhere = {k: v for k, v in commandstats(other).items() if not k.startswith(("info", "config"))}
        if len(results) != len(run_ids):
            raise RuntimeError(f"cluster {variant}: {len(results)} of {len(run_ids)} runs completed")
    finally:
        await close_stores()
    runs = len(run_ids)
    return {
        "per_wf": sum(commands.values()) / runs,
        "scripts": sum(v for k, v in commands.items() if k in ("evalsha", "eval", "fcall")) / runs,
        "others_per_wf": sum(elsewhere.values()) / runs,
        "cpu_us": used / runs * 1e6,
        "idle_per_s": idle_calls / idle,
        "rate": runs / took,
        "commands": commands,
    }


def ping_cost(client: Any, pid: int, calls: int = 20_000) -> float:
    """µs of the node's CPU per PING from one client, less what the node spends idle in as long
    (its cron and the cluster bus), measured just before."""
    cpu, began = cpu_seconds(pid), time.perf_counter()
    time.sleep(2.0)  # the node's idle CPU over a known time, not a synchronisation
    idle = (cpu_seconds(pid) - cpu) / (time.perf_counter() - began)
    cpu, began = cpu_seconds(pid), time.perf_counter()
    for _ in range(calls):
        client.ping()
    used = cpu_seconds(pid) - cpu - idle * (time.perf_counter() - began)
    return max(used, 0.0) / calls * 1e6


# -- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="overhead,fairness,rate,cluster", help="parts to run (default all)")
    parser.add_argument("--runs", type=int, default=1000, help="overhead: workflows per measurement (default 1000)")
    parser.add_argument("--workers", default="1,2", help="overhead: worker process counts (default 1,2)")
    parser.add_argument("--repeat", type=int, default=3, help="overhead and cluster: repetitions (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="runs per worker at once (default 32)")
    parser.add_argument("--fair-a", type=int, default=10_000, help="fairness: runs of key A (default 10000)")
    parser.add_argument("--fair-b", type=int, default=10, help="fairness: runs of key B (default 10)")
    parser.add_argument("--fair-repeat", type=int, default=1, help="fairness: repetitions (default 1)")
    parser.add_argument("--rate-runs", type=int, default=1000, help="rate: runs (default 1000)")
    parser.add_argument("--rate-repeat", type=int, default=2, help="rate: repetitions (default 2)")
    parser.add_argument("--cluster-runs", type=int, default=1000, help="cluster: runs per measurement (default 1000)")
    parser.add_argument("--idle", type=float, default=3.0, help="cluster: seconds the worker idles (default 3)")
    parser.add_argument("--patience", type=float, default=300.0, help="seconds a drain may take (default 300)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"overhead", "fairness", "rate", "cluster"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: use overhead, fairness, rate, cluster")
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.platform()}), "
        f"Python {platform.python_version()}, werkfluss {package_version('werkfluss')}, "
        f"redis-py {package_version('redis')}, hiredis {package_version('hiredis')}"
    )
    t0 = time.perf_counter()
    logs = Path(tempfile.mkdtemp(prefix="wfbench-q-logs-"))
    try:
        if parts & {"overhead", "fairness", "rate"}:
            server = Embedded("q")
            try:
                assert server.server is not None
                print(f"embedded server: pid {server.server.pid}, {server.dir}", flush=True)
                for name, part in (("overhead", overhead), ("fairness", fairness), ("rate", rate)):
                    if name in parts:
                        began = time.perf_counter()
                        part(server, args, logs)
                        print(f"  ({name}: {time.perf_counter() - began:.0f} s)")
            finally:
                server.close()
        if "cluster" in parts:
            began = time.perf_counter()
            cluster(args)
            print(f"  (cluster: {time.perf_counter() - began:.0f} s)")
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    print(f"\ntotal time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
