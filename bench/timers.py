"""A herd of timers: N runs sleeping until the same instant (issue 17, the fault suite's R-24 by hand).

Run from the repository root (see bench/README.md):

    python bench/timers.py                          # 10,000 runs, 2 workers, embedded Valkey and Debian's Redis
    python bench/timers.py --runs 2000,10000 --servers embedded

Each measurement: a fresh server (the embedded Valkey, or Debian's ``redis-server`` when
installed), W worker processes (``werkfluss worker timer_flows``), N runs of
``timer_flows.herd`` enqueued by 8 concurrent callers, every one sleeping until one moment
(`sleep_until`) `--lead` seconds ahead. Once all N are paused (their timers in the timer
set), the server's slowlog (>= 1 ms) and latency monitor (1 ms threshold) are reset, and a
thread of this process sends a PING every 10 ms until the herd has drained (those sent from
the instant on are kept).

Figures, on this machine's one clock:

- **on queue**: when the workers' MOVE_DUE calls (at most 100 timers each) had put the
  first and the last timer on the queue, after the instant; the calls that moved timers,
  the largest batch, and the slowest such call's round trip as the worker saw it;
- **lateness**: the step after the sleep starts, minus the instant, p50/p99/max; the herd's
  resumes/s (N over the last one's lateness): past the first batches, lateness is the
  workers working through the herd, not the timers;
- **server**: ``LATENCY LATEST``'s worst command event, the slowlog's slowest command
  and slowest MOVE_DUE, against the raw round trip: a PING before the herd (median) and
  the PINGs during it (p50, max).

Every run must fire once (one ``woke`` line per run) and complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import timer_flows  # noqa: E402  (the workers import it by this name too)
from _common import DebianRedis, Embedded, parse_ints, percentile, start_processes, stop_processes  # noqa: E402
from tables import fmt, print_table  # noqa: E402

from werkfluss import Settings, enqueue_async  # noqa: E402
from werkfluss._store import SCRIPTS  # noqa: E402
from werkfluss._store._open import close_stores, open_store  # noqa: E402

SCRIPTS_BY_SHA = {script.sha: script.name for script in SCRIPTS}
COMMAND_EVENTS = ("command", "fast-command")  # LATENCY LATEST's events for commands (not fsync, fork)
ENQUEUERS = 8
PING_EVERY = 0.01


@dataclass
class Herd:
    """One measurement's figures."""

    server: str
    runs: int
    workers: int
    at: float = float("nan")  # the instant (Unix time)
    paused_before: bool = False
    enqueue_s: float = float("nan")
    pause_s: float = float("nan")
    moves: list[tuple[int, float, float]] = field(default_factory=list)  # (moved, before, after)
    late: list[float] = field(default_factory=list)  # seconds, one per run (its first start)
    fires: Counter[int] = field(default_factory=Counter)  # starts per run -> runs
    completed: int = 0
    latency: dict[str, int] = field(default_factory=dict)
    slowest_ms: float = 0.0
    slowest_command: str = ""
    slowest_move_ms: float = 0.0
    ping_idle_us: float = float("nan")
    pings_ms: list[float] = field(default_factory=list)


class Pinger(threading.Thread):
    """A PING every `PING_EVERY` seconds on a connection of its own: what a client sees meanwhile."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(name="pinger", daemon=True)
        self.client = client
        self.rtts: list[tuple[float, float]] = []  # (unix time sent, ms)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            sent, t0 = time.time(), time.perf_counter()
            self.client.ping()
            self.rtts.append((sent, (time.perf_counter() - t0) * 1000))
            self.done.wait(PING_EVERY)  # the sampling period, not a synchronisation

    def stop(self) -> list[tuple[float, float]]:
        self.done.set()
        self.join(10)
        return self.rtts


def script_name(entry: dict[str, Any]) -> str:
    """A slowlog entry's command, a script named rather than its SHA."""
    command = entry.get("command", b"")
    words = [w.decode(errors="replace") for w in (command.split()[:2] if isinstance(command, bytes) else [])]
    if words[:1] == ["EVALSHA"] and len(words) > 1:
        return SCRIPTS_BY_SHA.get(words[1], words[1])
    return " ".join(words)


def wait_until(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def read_lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    *lines, _ = path.read_text().split("\n")  # the part after the last newline may be a line being written
    return [line.split(" ") for line in lines]


def measure(kind: str, runs: int, workers: int, concurrency: int, lead: float, patience: float) -> Herd:
    prefix = f"wfherd-{uuid.uuid4().hex[:6]}:"
    logs = Path(tempfile.mkdtemp(prefix="wf-herd-"))
    starts, moves = logs / "starts", logs / "moves"
    embedded: Embedded | None = None
    debian: DebianRedis | None = None
    if kind == "embedded":
        embedded = Embedded("herd")
        prefix, settings, client = embedded.prefix, embedded.settings, embedded.client()
        env = embedded.env()
    else:
        binary = shutil.which("redis-server")
        assert binary is not None
        debian = DebianRedis(binary)
        url = debian.start()
        settings = Settings(redis_url=url, prefix=prefix)
        client = redis.Redis.from_url(url)
        env = {**embedded_free_env(), "WERKFLUSS_REDIS_URL": url, "WERKFLUSS_PREFIX": prefix}
    env = {**env, "WF_BENCH_STARTS": str(starts), "WF_BENCH_MOVES": str(moves)}
    herd = Herd(kind, runs, workers)
    procs = []
    try:
        client.config_set("slowlog-log-slower-than", 1000)
        client.config_set("slowlog-max-len", 4096)
        client.config_set("latency-monitor-threshold", 1)
        herd.ping_idle_us = ping_us(client)
        argv = [sys.executable, "-m", "werkfluss", "worker", "timer_flows", "--concurrency", str(concurrency),
                "--log-level", "INFO"]  # fmt: skip
        procs = start_processes(argv, env, workers, "serving", logs)
        timers = f"{prefix}{{q}}:timers"
        begun = time.time()
        at = herd.at = round(begun + lead, 3)  # whole milliseconds: the timer set's unit, so one score for all

        async def enqueue() -> None:
            try:
                numbers = iter(range(runs))

                async def caller() -> None:
                    for n in numbers:
                        await enqueue_async(timer_flows.herd.options(settings=settings, run_id=f"herd-{n}"), n, at)

                async with anyio.create_task_group() as tg:
                    for _ in range(ENQUEUERS):
                        tg.start_soon(caller)
            finally:
                await close_stores()

        anyio.run(enqueue)
        herd.enqueue_s = time.time() - begun
        wait_until(lambda: client.zcard(timers) >= runs, f"all {runs} runs to pause", patience)
        paused = time.time()
        herd.pause_s = paused - begun
        herd.paused_before = paused < at
        client.slowlog_reset()
        client.execute_command("LATENCY", "RESET")  # type: ignore[no-untyped-call]
        pinger = Pinger(redis.Redis(connection_pool=client.connection_pool))
        pinger.start()
        try:
            wait_until(lambda: len(read_lines(starts)) >= runs, "every run to get past its sleep", lead + patience)
        finally:
            herd.pings_ms = [ms for sent, ms in pinger.stop() if sent >= at]
        herd.latency = {str(e[0], "utf-8", "replace"): int(e[3]) for e in latest(client)}
        entries = client.slowlog_get(4096)
        if entries:
            worst = max(entries, key=lambda e: e["duration"])
            herd.slowest_ms, herd.slowest_command = worst["duration"] / 1000, script_name(worst)
            herd.slowest_move_ms = (
                max((e["duration"] for e in entries if script_name(e) == "MOVE_DUE"), default=0) / 1000
            )

        first: dict[int, float] = {}
        per_run: Counter[int] = Counter()
        for n, t in read_lines(starts):
            per_run[int(n)] += 1
            first[int(n)] = min(first.get(int(n), float("inf")), float(t))
        herd.fires = Counter(per_run[n] for n in range(runs))
        herd.late = [t - at for t in first.values()]
        herd.moves = [(int(m), float(b), float(a)) for m, b, a in read_lines(moves)]

        async def statuses() -> int:
            try:
                store = await open_store(settings)
                return sum([await store.status(f"herd-{n}") == "completed" for n in range(runs)])
            finally:
                await close_stores()

        deadline = time.monotonic() + patience
        while (done := anyio.run(statuses)) < runs and time.monotonic() < deadline:
            time.sleep(0.5)
        herd.completed = done
    finally:
        stop_processes(procs)
        client.close()
        if embedded is not None:
            embedded.close()
        if debian is not None:
            debian.stop()
        shutil.rmtree(logs, ignore_errors=True)
    return herd


def embedded_free_env() -> dict[str, str]:
    """This environment for a worker of Debian's Redis: importing bench/, no embedded server."""
    path = os.pathsep.join(p for p in [str(BENCH), os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("WERKFLUSS_DIR", None)
    return env


def latest(client: redis.Redis) -> list[Any]:
    """``LATENCY LATEST``: ``[event, when, latest ms, max ms]`` per event."""
    return list(client.execute_command("LATENCY", "LATEST"))  # type: ignore[no-untyped-call]


def ping_us(client: redis.Redis, n: int = 500) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="10000", help="herd sizes, comma-separated")
    parser.add_argument("--servers", default="embedded,redis", help="embedded, redis (Debian's redis-server)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100, help="runs per worker at once")
    parser.add_argument("--lead", type=float, default=None, help="seconds to the instant (default 5 + runs / 100)")
    parser.add_argument("--patience", type=float, default=600, help="seconds a phase may take")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    if "redis" in kinds and shutil.which("redis-server") is None:
        print("redis-server: not installed, so its rows are skipped (apt-get install redis-server)")
        kinds.remove("redis")
    herds = []
    for runs in parse_ints(args.runs):
        for kind in kinds:
            lead = args.lead if args.lead is not None else 5 + runs / 100
            herds.append(measure(kind, runs, args.workers, args.concurrency, lead, args.patience))
            report(herds[-1])
    table(herds, args)


def report(herd: Herd) -> None:
    print(f"{herd.server} {herd.runs}: fires {dict(herd.fires)}, completed {herd.completed}", flush=True)


def table(herds: list[Herd], args: argparse.Namespace) -> None:
    rows, server_rows = [], []
    for h in herds:
        last_late = max(h.late, default=float("nan"))
        moved = [m for m, _, _ in h.moves]
        rows.append([
            h.server, f"{h.runs:,}", str(h.workers), "yes" if h.paused_before else "NO",
            fmt(h.enqueue_s, 1), fmt(h.pause_s, 1),
            fmt(min((a for _, _, a in h.moves), default=float("nan")) - h.at, 3),
            fmt(max((a for _, _, a in h.moves), default=float("nan")) - h.at, 3),
            str(len(moved)), str(max(moved, default=0)),
            fmt(max(((a - b) * 1000 for _, b, a in h.moves), default=float("nan")), 1),
            fmt(percentile(h.late, 0.5), 2), fmt(percentile(h.late, 0.99), 2), fmt(last_late, 2),
            fmt(h.runs / last_late if last_late > 0 else float("nan"), 0),
            "/".join(f"{k}x{v}" for k, v in sorted(h.fires.items())), f"{h.completed:,}",
        ])  # fmt: skip
        events = max((h.latency.get(e, 0) for e in COMMAND_EVENTS), default=0)
        server_rows.append([
            h.server, f"{h.runs:,}", str(events), fmt(h.slowest_ms, 2), h.slowest_command or "-",
            fmt(h.slowest_move_ms, 2) if h.slowest_move_ms else "< 1", fmt(h.ping_idle_us, 0),
            fmt(percentile(h.pings_ms, 0.5), 2), fmt(percentile(h.pings_ms, 0.99), 2),
            fmt(max(h.pings_ms, default=0), 2), str(len(h.pings_ms)),
        ])  # fmt: skip
    print_table(
        "Timer herd: N runs sleeping until one instant",
        [
            "server",
            "runs",
            "workers",
            "paused before",
            "enqueue s",
            "all paused s",
            "first on queue s",
            "last on queue s",
            "MOVE_DUE calls",
            "largest",
            "slowest MOVE_DUE ms",
            "late p50 s",
            "late p99 s",
            "late max s",
            "resumes/s",
            "fired",
            "completed",
        ],
        rows,
        [
            f"{args.workers} workers of --concurrency {args.concurrency}; on queue: after the instant, the end of the"
            " MOVE_DUE call (worker's clock = this machine's) that moved the first / last timer",
            "late: the step after the sleep starts, minus the instant; resumes/s: runs / late max;"
            " fired: starts x runs",
        ],
        left=1,
    )
    print_table(
        "Timer herd: the server's worst command, against a raw round trip",
        [
            "server",
            "runs",
            "LATENCY LATEST max ms",
            "slowlog worst ms",
            "command",
            "slowlog MOVE_DUE ms",
            "PING idle us",
            "PING during p50 ms",
            "p99 ms",
            "max ms",
            "PINGs",
        ],
        server_rows,
        [
            "from the moment all runs were paused until every run got past its sleep; LATENCY LATEST: the worst"
            " 'command' or 'fast-command' event (threshold 1 ms, so 0 = none over 1 ms); slowlog: commands >= 1 ms",
            f"PING: a redis-py client of this process, one every {PING_EVERY * 1000:g} ms from the instant on",
        ],
        left=1,
    )


if __name__ == "__main__":
    main()
