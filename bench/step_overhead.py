"""What one werkfluss step costs, next to the Redis round trips it is made of.

Run from the repository root:

    python bench/step_overhead.py                 # everything, about 1.5 minutes on 2 cores
    python bench/step_overhead.py --quick         # replay of 1k/10k steps only
    python bench/step_overhead.py --profile       # also cProfile a 1000-step run
    python bench/step_overhead.py --redis-url unix:///path/redis.sock   # instead of Debian's redis-server

Everything runs in one process and one event loop (``anyio.run``), so the
connections of a server are opened once and reused, as in a long-lived
worker. See bench/README.md for what each table means.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib.util
import io
import itertools
import json
import logging
import os
import platform
import pstats
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import hiredis
import msgspec
import redis
import redis.asyncio as aioredis
from _common import (
    DebianRedis,
    Embedded,
    ReplaySample,
    package_version,
    parse_ints,
    read_reply,
    reply_parser,
    resp,
    runs_per_sample,
)
from tables import fmt, print_table

from werkfluss import Settings, start_async, step, workflow
from werkfluss._context import StepContext, current_run, enter_step, exit_step
from werkfluss._events import StepCompleted, encode_event
from werkfluss._store._embedded import server_status
from werkfluss._store._open import close_stores, open_store
from werkfluss._store._run_log import APPEND
from werkfluss._values import call_digest, convert_value, encode_call, encode_checked

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from werkfluss._store import RedisStore

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional
    psutil = None


# -- the workflows under test -----------------------------------------------------------


@step
async def noop(i: int) -> int:
    return i


# Nanoseconds of each step of the last `chain` run, timed inside the workflow,
# for a per-step median next to the raw calls' medians.
STEP_TIMES: list[int] = []


@workflow
async def chain(n: int) -> int:
    """N trivial steps in a row: n = 0 measures the fixed cost of a run."""
    total = 0
    clock = time.perf_counter_ns
    times = STEP_TIMES
    for i in range(n):
        t0 = clock()
        total += await noop(i)
        times.append(clock() - t0)
    return total


# The replay table's "bug": a run of K steps fails once at its end; the
# "fixed" code (this flag off) then replays the K steps from the log and completes.
FAIL_AT_END = True


class BenchFailure(Exception):
    """Raised by `replay_chain` while FAIL_AT_END is set."""


@workflow
async def replay_chain(k: int) -> int:
    total = 0
    for i in range(k):
        total += await noop(i)
    if FAIL_AT_END:
        raise BenchFailure("failing once after all steps, on purpose")
    return total


# -- small helpers --------------------------------------------------------------------------


def new_run_id(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:16]}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def step_event_size() -> int:
    """Bytes of a StepCompleted event of `noop`, as the log stores it."""
    args = msgspec.Raw(encode_call(noop.id, (500,), {}))
    result = msgspec.Raw(encode_checked(500, owner=noop.id, where="result"))
    now = time.time()
    return len(encode_event(StepCompleted(now, 500, noop.id, 1, now, args, result)))


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` (None without psutil or pid)."""
    if psutil is None or pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


class RssSampler:
    """Peak RSS of this process above a baseline, sampled by a thread (psutil)
    or, without psutil, the growth of ``ru_maxrss`` (only seen above an earlier peak)."""

    method = "psutil RSS sampled every 5 ms" if psutil is not None else "ru_maxrss delta (underestimates)"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0
        self.peak = 0
        self._maxrss0 = 0

    def _rss(self) -> int:
        assert psutil is not None
        return int(psutil.Process().memory_info().rss)

    def __enter__(self) -> RssSampler:
        gc.collect()
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if psutil is not None:
            self.baseline = self.peak = self._rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def extra_mib(self) -> float:
        if psutil is not None:
            return (self.peak - self.baseline) / 2**20
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0  # KiB on Linux
        return grown_kib / 1024


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Target:
    """One server configuration under test."""

    label: str
    settings: Settings
    embedded_dir: Path | None = None  # stop_server() this at the end
    pid: int | None = None  # for server CPU time
    version: str = "?"


# -- measurements ----------------------------------------------------------------------------

# The same XADD as a step's event, but alone in a script: the script-call floor.
_TRIVIAL_XADD = "return redis.call('XADD', KEYS[1], ARGV[1], 'e', ARGV[2])"
_APPEND_STEP_LUA = APPEND.source  # the script of a live step
# What RedisStore.connect() sets beyond redis-py's defaults.
_STORE_OPTIONS = ("socket_timeout", "socket_connect_timeout", "health_check_interval", "retry", "retry_on_error")


@dataclass
class RunSample:
    wall: float  # seconds
    cpu: float  # seconds of this process
    server_cpu: float | None  # seconds of the server process
    server_evalsha_us: float | None = None  # INFO commandstats usec_per_call of EVALSHA
    step_median_us: float | None = None  # median of the steps timed inside the workflow


@dataclass
class ServerResult:
    target: Target
    runs: dict[int, list[RunSample]] = field(default_factory=dict)  # N -> one sample per repetition
    raw_samples: dict[str, list[RawSample]] = field(default_factory=dict)  # kind -> one per repetition

    def raw(self, kind: str) -> float:
        """Median over repetitions of the median µs per call."""
        return median([s.us for s in self.raw_samples.get(kind, [])])

    def raw_mean(self, kind: str) -> float:
        """Median over repetitions of the mean µs per call."""
        return median([s.mean_us for s in self.raw_samples.get(kind, [])])

    def raw_cpu(self, kind: str) -> float:
        return median([s.cpu_us for s in self.raw_samples.get(kind, [])])

    def raw_server(self, kind: str) -> float | None:
        values = [s.server_us for s in self.raw_samples.get(kind, []) if s.server_us is not None]
        return median(values) if values else None


async def reset_stats(client: aioredis.Redis) -> bool:
    try:
        await client.config_resetstat()
    except redis.RedisError:
        return False
    return True


async def usec_per_call(client: aioredis.Redis, command: str) -> float | None:
    """Server-side µs per call of `command` since the last CONFIG RESETSTAT."""
    try:
        stats = await client.info("commandstats")
    except redis.RedisError:
        return None
    entry = stats.get(f"cmdstat_{command}")
    return float(entry["usec_per_call"]) if entry else None


async def timed_run(target: Target, wf: Any, n: int, store: RedisStore, *, stats: bool = False) -> RunSample:
    bound = wf.options(settings=target.settings, run_id=new_run_id(f"n{n}"))
    has_stats = stats and await reset_stats(store.client)
    gc.collect()
    STEP_TIMES.clear()
    server0 = cpu_seconds(target.pid)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = await start_async(bound, n)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    server1 = cpu_seconds(target.pid)
    assert result == n * (n - 1) // 2, result
    server = server1 - server0 if server0 is not None and server1 is not None else None
    sample = RunSample(wall, cpu, server)
    if STEP_TIMES:
        sample.step_median_us = statistics.median(STEP_TIMES) / 1000
    if has_stats:
        sample.server_evalsha_us = await usec_per_call(store.client, "evalsha")
    return sample


@dataclass
class RawSample:
    us: float  # median wall µs per call
    cpu_us: float  # this process's CPU µs per call (mean)
    mean_us: float  # mean wall µs per call
    server_us: float | None = None  # the server's own µs per call (INFO commandstats)


def median_sample(runs: list[RunSample]) -> RunSample:
    """The run with the median wall time (the lower median for an even count)."""
    return sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]


async def per_call_us(calls: int, fn: Callable[[], Awaitable[Any]]) -> RawSample:
    """Median µs of `calls` sequential awaits of ``fn()``, and the CPU they took."""
    samples = []
    clock = time.perf_counter_ns
    cpu0 = time.process_time()
    for _ in range(calls):
        t0 = clock()
        await fn()
        samples.append(clock() - t0)
    cpu = (time.process_time() - cpu0) / calls * 1e6
    return RawSample(statistics.median(samples) / 1000, cpu, statistics.fmean(samples) / 1000)


def _ping_command(password: str | None, username: str | None) -> tuple[bytes, bytes]:
    auth = b""
    if password:
        auth = resp("AUTH", *([username] if username else []), password)
    return auth, resp("PING")


def _blocking_ping_us(kwargs: dict[str, Any], calls: int) -> RawSample | None:
    """PING over a plain blocking socket: the transport and scheduler floor (no asyncio, no redis-py)."""
    auth, ping = _ping_command(kwargs.get("password"), kwargs.get("username"))
    if "path" in kwargs:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = kwargs["path"]
    elif "host" in kwargs and not kwargs.get("ssl"):
        sock = socket.socket(socket.AF_INET6 if ":" in kwargs["host"] else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = (kwargs["host"], int(kwargs.get("port", 6379)))
    else:
        return None
    with sock:
        sock.settimeout(5)
        sock.connect(address)
        if auth:
            sock.sendall(auth)
            sock.recv(128)
        samples = []
        clock = time.perf_counter_ns
        cpu0 = time.process_time()
        for _ in range(calls):
            t0 = clock()
            sock.sendall(ping)
            sock.recv(128)
            samples.append(clock() - t0)
        cpu = (time.process_time() - cpu0) / calls * 1e6
    return RawSample(statistics.median(samples) / 1000, cpu, statistics.fmean(samples) / 1000)


async def _stream_us(kwargs: dict[str, Any], calls: int, command: Callable[[], bytes]) -> RawSample | None:
    """Hand-packed commands over a bare asyncio stream (the fast lane's reply reader, nothing else of it)."""
    auth, _ = _ping_command(kwargs.get("password"), kwargs.get("username"))
    if "path" in kwargs:
        reader, writer = await asyncio.open_unix_connection(kwargs["path"])
    elif "host" in kwargs and not kwargs.get("ssl"):
        reader, writer = await asyncio.open_connection(kwargs["host"], int(kwargs.get("port", 6379)))
    else:
        return None
    try:
        if auth:
            writer.write(auth)
            await reader.readline()
        parser = reply_parser()

        async def one() -> None:
            writer.write(command())
            await read_reply(reader, parser)

        return await per_call_us(calls, one)
    finally:
        writer.close()


async def raw_round_trips(store: RedisStore, calls: int, payload: bytes) -> dict[str, RawSample]:
    """Median µs per call, and the server's own µs per call, of the commands a step is made of."""
    client = store.client
    tag = uuid.uuid4().hex[:12]
    xadd_key = f"{store.prefix}rawbench:{tag}:xadd"
    eval_key = f"{store.prefix}rawbench:{tag}:eval"
    trivial = client.register_script(_TRIVIAL_XADD)
    script_run, store_run = f"rawbench-{tag}-script", f"rawbench-{tag}-store"
    for run_id in (script_run, store_run):
        await client.hset(store.key(run_id, "state"), mapping={"epoch": 1, "n": 0})
    append_keys = [store.key(script_run, part) for part in ("state", "log", "steps")]
    append_script = client.register_script(_APPEND_STEP_LUA)  # a live step's Lua, without RedisStore around it
    ids = {kind: itertools.count(1) for kind in ("xadd", "evalsha", "append_script", "append_step", "plain", "lane")}
    lane_key = f"{store.prefix}rawbench:{tag}:lane"
    # The same server with redis-py's defaults: no socket_timeout (on Python 3.11 redis-py then
    # wraps every send in asyncio.wait_for, a new Task), no health checks, no retry object.
    kwargs = store.client.connection_pool.connection_kwargs
    # The step's script, hand-packed (a constant prefix) and written straight to an asyncio stream.
    stream_run = f"rawbench-{tag}-stream"
    await client.hset(store.key(stream_run, "state"), mapping={"epoch": 1, "n": 0})
    stream_keys = [store.key(stream_run, part) for part in ("state", "log", "steps")]
    sha = await client.script_load(_APPEND_STEP_LUA)
    head = resp("EVALSHA", sha, 3, *stream_keys, 1)[len(b"*7\r\n") :]
    tail = resp(payload, 10000, "")[len(b"*3\r\n") :]  # event, lease ms, seen (none: no rollback check)
    stream_ids = itertools.count(1)

    def append_packed() -> bytes:
        field = b"c%d" % next(stream_ids)
        return b"*11\r\n" + head + b"$%d\r\n%s\r\n" % (len(field), field) + tail  # 7 + field + 3 parts

    pool = store.client.connection_pool
    plain_kwargs = {k: v for k, v in kwargs.items() if k not in _STORE_OPTIONS}
    plain = aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(connection_class=pool.connection_class, **plain_kwargs)
    )
    plain_script = plain.register_script(_APPEND_STEP_LUA)
    plain_run = f"rawbench-{tag}-plain"
    await plain.hset(store.key(plain_run, "state"), mapping={"epoch": 1, "n": 0})
    plain_keys = [store.key(plain_run, part) for part in ("state", "log", "steps")]

    cases: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = [
        ("ping", "ping", client.ping),
        ("xadd", "xadd", lambda: client.xadd(xadd_key, {"e": payload}, id=f"0-{next(ids['xadd'])}")),
        ("evalsha", "evalsha", lambda: trivial(keys=[eval_key], args=[f"0-{next(ids['evalsha'])}", payload])),
        (
            "append_script",
            "evalsha",
            lambda: append_script(keys=append_keys, args=[1, f"c{next(ids['append_script'])}", payload, 10000, ""]),
        ),
        (
            "append_step",
            "evalsha",
            lambda: store.append(store_run, 1, f"c{next(ids['append_step'])}", payload, 10.0),
        ),
        ("ping_plain", "ping", plain.ping),
        (
            "append_plain",
            "evalsha",
            lambda: plain_script(keys=plain_keys, args=[1, f"c{next(ids['plain'])}", payload, 10000, ""]),
        ),
    ]
    lane = store._lane  # werkfluss's own path for scripts (None on a cluster)
    if lane is not None:
        # The commands of the first table on the fast lane: the connection kind a step's script uses.
        cases += [
            ("ping_lane", "ping", lambda: lane.call((b"PING",))),
            ("xadd_lane", "xadd", lambda: lane.call((b"XADD", lane_key, f"0-{next(ids['lane'])}", b"e", payload))),
        ]
    floors = {
        "ping_socket": _blocking_ping_us(kwargs, calls),
        "ping_stream": await _stream_us(kwargs, calls, lambda: resp("PING")),
        "append_stream": await _stream_us(kwargs, calls, append_packed),
    }
    out = {kind: sample for kind, sample in floors.items() if sample is not None}
    for kind, command, fn in cases:
        await per_call_us(min(100, calls), fn)  # warm this path (and load the script)
        has_stats = await reset_stats(client)
        out[kind] = await per_call_us(calls, fn)
        if has_stats:
            out[kind].server_us = await usec_per_call(client, command)
    runs = (script_run, store_run, plain_run, stream_run)
    await client.delete(
        xadd_key, eval_key, lane_key, *(store.key(r, p) for r in runs for p in ("state", "log", "steps"))
    )
    await plain.aclose()
    return out


async def prepare(target: Target, payload: bytes) -> ServerResult:
    """Connect (starting the embedded server), identify the server, warm every path up."""
    store = await open_store(target.settings)
    info = await store.client.info("server")
    valkey = info.get("valkey_version")
    target.version = f"valkey {valkey}" if valkey else f"redis {info.get('redis_version', '?')}"
    if target.embedded_dir is not None:
        running = server_status(target.embedded_dir)
        target.pid = running.pid if running is not None else None
    elif info.get("process_id") and target.pid is None and _is_local(store):
        target.pid = int(info["process_id"])
    for _ in range(3):  # warm-up: connections, scripts, code paths
        await timed_run(target, chain, 10, store)
    await raw_round_trips(store, 200, payload)
    return ServerResult(target)


async def measure_once(result: ServerResult, steps: Sequence[int], calls: int, payload: bytes) -> None:
    """One repetition on one server: a run for N = 0 and every N, then the raw calls."""
    target = result.target
    store = await open_store(target.settings)
    biggest = max(steps)
    await timed_run(target, chain, 1, store)  # untimed: the first run after another server's turn is slower
    for n in (0, *steps):
        runs = [await timed_run(target, chain, n, store, stats=n == biggest) for _ in range(runs_per_sample(n))]
        result.runs.setdefault(n, []).append(median_sample(runs))
    for kind, sample in (await raw_round_trips(store, calls, payload)).items():
        result.raw_samples.setdefault(kind, []).append(sample)


def _is_local(store: RedisStore) -> bool:
    kwargs = store.client.connection_pool.connection_kwargs
    return "path" in kwargs or kwargs.get("host") in ("localhost", "127.0.0.1", "::1")


async def replay_case(target: Target, k: int) -> ReplaySample:
    global FAIL_AT_END
    # Past Settings.max_history (51,200 events by default) a run refuses to go on: raise it for K = 100k.
    limits = {"history_warning": 2 * k + 100, "max_history": 2 * k + 100}
    settings = msgspec.structs.replace(target.settings, **limits)
    bound = replay_chain.options(settings=settings, run_id=new_run_id(f"replay{k}"))
    FAIL_AT_END = True
    t0 = time.perf_counter()
    try:
        await start_async(bound, k)
    except BenchFailure:
        pass
    else:
        raise AssertionError("the replay workflow should have failed once")
    build = time.perf_counter() - t0
    store = await open_store(settings)
    status = await store.status(bound.run_options.run_id)
    assert status == "failed", status
    FAIL_AT_END = False
    with RssSampler() as rss:
        t0 = time.perf_counter()
        result = await start_async(bound, k)
        replay = time.perf_counter() - t0
    assert result == k * (k - 1) // 2, result
    return ReplaySample(k, build, replay, rss.extra_mib)


async def profile_steps(target: Target, n: int, top: int) -> None:
    store = await open_store(target.settings)
    await timed_run(target, chain, n, store)  # warm
    plain = median([(await timed_run(target, chain, n, store)).wall for _ in range(3)])
    bound = chain.options(settings=target.settings, run_id=new_run_id("profile"))
    profiler = cProfile.Profile()
    gc.collect()
    t0 = time.perf_counter()
    profiler.enable()
    await start_async(bound, n)
    profiler.disable()
    profiled = time.perf_counter() - t0
    print()
    print(f"cProfile of one {n}-step run on {target.label} ({target.version})")
    print(
        f"  run wall / N: {plain * 1e6 / n:,.1f} µs without the profiler (median of 3), "
        f"{profiled * 1e6 / n:,.1f} µs under it"
    )
    print("  (under cProfile every Python call costs extra, so pure-Python code looks heavier than it is;")
    print("   a suspended coroutine is off the stack: waiting for the server shows up as epoll.poll)")
    for key in ("cumulative", "tottime"):
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer).strip_dirs().sort_stats(key)
        stats.print_stats(top)
        text = buffer.getvalue()
        start = text.find("   ncalls")
        print()
        print(f"top {top} by {key} (of {stats.total_tt:.3f} s profiled):")
        print(text[start:].rstrip())
    print_profile_groups(pstats.Stats(profiler), n)
    await micro_costs(store)


def _profile_group(filename: str, func: str) -> str:
    path = filename.replace("\\", "/")
    if "/werkfluss/" in path:
        return "werkfluss (_runtime, _store, _events, _context, ...)"
    if "/redis/" in path:
        return "redis-py (Python code)"
    if "/anyio/" in path:
        return "anyio"
    if "/asyncio/" in path or path.endswith("selectors.py"):
        return "asyncio event loop and streams (Python code)"
    if path.endswith("step_overhead.py"):
        return "this benchmark (workflow body, noop)"
    if path == "~":
        if "_socket.socket" in func:
            return "syscalls: socket send/recv"
        if "epoll" in func:
            return "syscalls: epoll (waiting for the server)"
        if "msgspec" in func:
            return "msgspec (C)"
        return "other builtins (isinstance, len, contextvars, ...)"
    return "other stdlib"


def print_profile_groups(stats: pstats.Stats, n: int) -> None:
    """Self time (tottime) of the profiled run, summed by package."""
    groups: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        name = _profile_group(filename, func)
        groups[name] = groups.get(name, 0.0) + tottime
    total = sum(groups.values())
    rows = [
        [name, f"{seconds * 1e3:,.1f}", f"{seconds / total:.0%}", fmt(seconds / n * 1e6)]
        for name, seconds in sorted(groups.items(), key=lambda item: -item[1])
    ]
    print_table(
        "Profiled self time by package (tottime summed; includes the profiler's own overhead per call)",
        ["where", "ms", "share", "µs per step"],
        rows,
        left=1,
    )


async def micro_costs(store: RedisStore) -> None:
    """CPU cost of the pieces of a live step, without I/O (timeit, best of 5)."""
    payload_args = (500,)
    args_raw = msgspec.Raw(encode_call(noop.id, payload_args, {}))
    now = time.time()
    event = StepCompleted(now, 500, noop.id, 1, now, args_raw, msgspec.Raw(b"\xcd\x01\xf4"))
    encoded = encode_event(event)
    connection = store.client.connection_pool.make_connection()
    keys = [store.key("run", "state"), store.key("run", "log"), store.key("run", "steps")]
    sha = APPEND.sha
    log = logging.getLogger("werkfluss")

    def enter_exit() -> None:
        exit_step(enter_step(StepContext("run", noop.id, 500, 1)))

    pieces: list[tuple[str, Callable[[], Any]]] = [
        ("time.time()", time.time),
        ("current_run() (2 ContextVar.get)", current_run),
        ("encode_call(step.id, args, {})  [to_builtins + encode]", lambda: encode_call(noop.id, payload_args, {})),
        ("call_digest(args, {})  [argument check, live and replay]", lambda: call_digest(payload_args, {})),
        ("encode_checked(result)", lambda: encode_checked(500, owner=noop.id, where="result")),
        (
            "convert_value(result)  [the live value as a replay decodes it]",
            lambda: convert_value(b"\xcd\x01\xf4", int, 500, owner=noop.id, where="result"),
        ),
        ("StepContext + enter_step + exit_step", enter_exit),
        ("StepCompleted(...) construction", lambda: StepCompleted(now, 500, noop.id, 1, now, args_raw, args_raw)),
        ("encode_event(StepCompleted)", lambda: encode_event(event)),
        ("3 x RedisStore.key() f-strings", lambda: [store.key("run", p) for p in ("state", "log", "steps")]),
        ("log.debug(...) while DEBUG is off", lambda: log.debug("run %s: step #%d %s", "run", 500, noop.id)),
        (
            "hiredis pack_command(EVALSHA, 8 args)",
            lambda: hiredis.pack_command((b"EVALSHA", sha, 3, *keys, 1, "c500", encoded, 10000, "")),
        ),
        (
            "redis-py pack_command(EVALSHA, 8 args)",
            lambda: connection.pack_command("EVALSHA", sha, 3, *keys, 1, "c500", encoded, 10000, ""),
        ),
    ]
    rows = []
    for name, fn in pieces:
        loops = 20000
        best = min(timeit.repeat(fn, number=loops, repeat=5)) / loops
        rows.append([name, fmt(best * 1e6, 3)])
    print_table("CPU cost of step-path pieces (no I/O; timeit, best of 5)", ["piece", "µs per call"], rows, left=1)


# -- reporting ---------------------------------------------------------------------------------


def report_steps(results: Sequence[ServerResult], steps: Sequence[int], calls: int) -> None:
    header = [
        "server", "N", "per-step µs (median)", "min", "max", "XADD µs", "XADD lane µs", "append() µs",
        "step/XADD", "step/XADD lane", "step/append()",
    ]  # fmt: skip
    rows = []
    for res in results:
        xadd = res.raw("xadd")
        lane = res.raw("xadd_lane")
        append = res.raw("append_step")
        base_runs = [s.wall for s in res.runs[0]]
        base = median(base_runs)
        rows.append([
            res.target.label, "0 (whole run)", fmt(base * 1e6), fmt(min(base_runs) * 1e6), fmt(max(base_runs) * 1e6),
            fmt(xadd), fmt(lane), fmt(append), "-", "-", "-",
        ])  # fmt: skip
        for n in steps:
            per_step = [(s.wall - base) / n * 1e6 for s in res.runs[n]]
            mid = median(per_step)
            rows.append([
                res.target.label, str(n), fmt(mid), fmt(min(per_step)), fmt(max(per_step)),
                fmt(xadd), fmt(lane), fmt(append), ratio(mid, xadd), ratio(mid, lane), ratio(mid, append),
            ])  # fmt: skip
    print_table(
        "Live steps: per-step cost = (wall of an N-step run - median wall of a 0-step run) / N",
        header,
        rows,
        [
            "N = 0 rows: the fixed cost of a whole run without steps (acquire, ZADD, finish, task group), µs per run.",
            "min/max: over the repetitions, each against the median 0-step run; a repetition's figure for a short",
            "  run is the median of several runs (15 for N <= 20, 3 for N = 100, 1 for N = 1000).",
            f"raw columns: median of {calls} sequential calls, median over repetitions. XADD: redis.asyncio on the",
            "  store's own client, the event's size. XADD lane: the same XADD on werkfluss's fast lane (the",
            "  connection kind a step's script goes through). append(): RedisStore.append(), the step's own",
            "  script (fencing, dedup, XADD, lease) on the fast lane, without the runtime around it.",
            "ratios: per-step cost / raw round trip (a step's marginal cost is a mean, the raw figures medians).",
        ],
        left=2,
    )


def ratio(value: float, base: float) -> str:
    if value != value or base != base or base == 0:  # NaN or missing
        return "-"
    return f"{value / base:.2f}x"


def report_breakdown(results: Sequence[ServerResult], steps: Sequence[int]) -> None:
    n = max(steps)
    header = [
        "server", "what", "wall µs median", "wall µs mean", "client CPU µs", "server CPU µs", "server µs in command",
    ]  # fmt: skip
    rows = []
    for res in results:
        base = res.runs[0]
        big = res.runs[n]

        def marginal(
            get: Callable[[RunSample], float | None], base: list[RunSample] = base, big: list[RunSample] = big
        ) -> float | None:
            values = [get(s) for s in base]
            if any(v is None for v in values):
                return None
            b = median([v for v in values if v is not None])
            per = [(v - b) / n * 1e6 for s in big if (v := get(s)) is not None]
            return median(per) if len(per) == len(big) else None

        server_cmd = [s.server_evalsha_us for s in big if s.server_evalsha_us is not None]
        in_run = [s.step_median_us for s in big if s.step_median_us is not None]
        rows.append([
            res.target.label, f"werkfluss step (N={n})", fmt(median(in_run) if in_run else None),
            fmt(marginal(lambda s: s.wall)),
            fmt(marginal(lambda s: s.cpu)), fmt(marginal(lambda s: s.server_cpu)),
            fmt(median(server_cmd) if server_cmd else None, 2),
        ])  # fmt: skip
        names = {
            "append_step": "RedisStore.append() (fast lane)",
            "append_script": "EVALSHA append script (redis-py)",
            "evalsha": "EVALSHA trivial XADD (redis-py)",
            "xadd": "XADD (redis-py)",
            "xadd_lane": "XADD (werkfluss fast lane)",
            "append_plain": "EVALSHA append script (redis-py defaults)",
            "append_stream": "EVALSHA append script (asyncio streams)",
            "ping": "PING (redis-py)",
            "ping_lane": "PING (werkfluss fast lane)",
            "ping_plain": "PING (redis-py defaults)",
            "ping_stream": "PING (asyncio streams, no redis-py)",
            "ping_socket": "PING (blocking socket, no asyncio)",
        }
        for kind, name in names.items():
            if kind in res.raw_samples:
                rows.append([
                    res.target.label, name, fmt(res.raw(kind)), fmt(res.raw_mean(kind)), fmt(res.raw_cpu(kind)), "",
                    fmt(res.raw_server(kind), 2),
                ])  # fmt: skip
    print_table(
        "Where a step's time goes (medians over repetitions)",
        header,
        rows,
        [
            "wall µs median: of single steps timed inside the workflow (perf_counter around each await), or of",
            f"  single raw calls. wall µs mean: for the step, the marginal figure of the first table (N={n});",
            "  for raw calls, their total time / calls. Means include the slow tail (scheduler, GC) that medians hide.",
            "client CPU: this process's CPU time (user+system, incl. syscalls) per step or call (a mean; for the",
            "  step marginal like the wall mean). server CPU: the server process's (psutil, local servers only;",
            "  clock ticks of 10 ms, so +-10 µs at N=1000). Wall > CPU: waiting for the other process to be scheduled.",
            "server µs in command: INFO commandstats usec_per_call (EVALSHA includes its Lua and inner commands).",
            "append script: the Lua of a live step (TIME, HMGET, HEXISTS, HINCRBY, XADD, 2 HSET), a real-size event.",
            "redis-py: the store's client (socket_timeout=30, health checks, retries); redis-py defaults: a client",
            "  with none of these (on Python < 3.12 a socket_timeout wraps each send in asyncio.wait_for, a new Task).",
            "fast lane: werkfluss's path for its scripts: redis-py's connections, hand-packed RESP, its own reply",
            "  parser, one timer for all timeouts. asyncio streams: the same bytes on a bare asyncio connection, the",
            "  reply read by the lane's parser. blocking socket: no event loop either (the transport floor).",
        ],
        left=2,
    )


def report_durability(results: Sequence[ServerResult], steps: Sequence[int]) -> None:
    by_fsync = {res.target.settings.fsync: res for res in results if res.target.embedded_dir is not None}
    if len(by_fsync) < 2:
        return
    rows = []
    for n in steps:
        row = [str(n)]
        mids = {}
        for mode in ("everysec", "always"):
            res = by_fsync[mode]
            base = median([s.wall for s in res.runs[0]])
            per = [(s.wall - base) / n * 1e6 for s in res.runs[n]]
            mids[mode] = median(per)
            row += [fmt(mids[mode]), f"{fmt(min(per))} .. {fmt(max(per))}"]
        row.append(f"{mids['always'] / mids['everysec']:.2f}x")
        rows.append(row)
    everysec, always = by_fsync["everysec"], by_fsync["always"]
    rows.append([
        "raw XADD", fmt(everysec.raw("xadd")), "", fmt(always.raw("xadd")), "",
        f"{always.raw('xadd') / everysec.raw('xadd'):.2f}x",
    ])  # fmt: skip
    print_table(
        "Durability (embedded server): per-step µs with appendfsync everysec vs always",
        ["N", "everysec µs", "min .. max", "always µs", "min .. max", "always/everysec"],
        rows,
        ["always: the server fsyncs its AOF before replying to each write, so every step waits for the disk."],
        left=1,
    )


def report_replay(samples: Sequence[ReplaySample]) -> None:
    rows = []
    for k in sorted({s.k for s in samples}):
        mine = [s for s in samples if s.k == k]
        replay = [s.replay_s for s in mine]
        build = [s.build_s for s in mine]
        mid = median(replay)
        rows.append([
            f"{k:,}", str(len(mine)), fmt(mid, 3), f"{fmt(min(replay), 3)} .. {fmt(max(replay), 3)}",
            fmt(mid / k * 1000, 3), fmt(median([s.extra_mib for s in mine])),
            fmt(median(build), 2), fmt(median(build) / k * 1e6),
        ])  # fmt: skip
    print_table(
        "Replay (embedded server): a failed run with K completed steps, started again with fixed code",
        ["K", "runs", "replay s", "min .. max", "s per 1k steps", "peak extra RSS MiB", "build s", "build µs/step"],
        rows,
        [
            "replay s: the second start_async: acquire, read the log (XRANGE, 2000 a batch), decode,",
            "  replay K steps, finish.",
            f"peak extra RSS: {RssSampler.method}, above the RSS just before the replay.",
            "build: the first run (K live steps, then the failure); µs/step shows if a step slows as the log grows.",
        ],
        left=1,
    )


# -- main -----------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, targets: list[Target]) -> None:
    payload = b"x" * step_event_size()
    results: list[ServerResult] = []
    dbos_walls: list[dict[str, float]] = []
    try:
        print(f"\nlive steps (N = {', '.join(map(str, args.steps))}), payload {len(payload)} bytes:", flush=True)
        for target in targets:
            result = await prepare(target, payload)
            results.append(result)
            print(f"  {target.label}: {target.version}", flush=True)
        for rep in range(args.repeat):
            # Servers, N values and raw calls are interleaved within each
            # repetition, so that noise on the shared cores hits them alike.
            print(f"  repetition {rep + 1}/{args.repeat}", flush=True)
            for result in results:
                await measure_once(result, args.steps, args.calls, payload)
            if args.dbos:
                dbos_walls.append(await anyio.to_thread.run_sync(dbos_steps, args.steps))
        print(f"\nservers: {'; '.join(f'{t.label} = {t.version}' for t in targets)}")
        report_steps(results, args.steps, args.calls)
        report_breakdown(results, args.steps)
        report_durability(results, args.steps)
        if args.dbos:
            report_dbos_steps(results[0], dbos_walls, args.steps)

        replay_target = targets[0]
        samples: list[ReplaySample] = []
        if args.replay:
            if max(args.replay) >= 100_000:
                print(
                    f"\nreplay: building a {max(args.replay):,}-step run first takes a while "
                    "(about 20 s on a 2-core VM); --quick skips it",
                    flush=True,
                )
            for k in args.replay:
                reps = min(args.repeat, 3) if k <= 10_000 else 1
                for _ in range(reps):
                    sample = await replay_case(replay_target, k)
                    print(
                        f"  K={k:,}: built in {sample.build_s:.2f} s, replayed in {sample.replay_s:.3f} s", flush=True
                    )
                    samples.append(sample)
            report_replay(samples)
            if args.dbos:
                dbos_samples = []
                for k in [k for k in args.replay if k <= args.dbos_max_replay]:
                    for _ in range(min(args.repeat, 3) if k <= 1000 else 1):
                        print(f"  DBOS K={k:,}: building (a process that dies after the last step)...", flush=True)
                        dbos_samples.append(await anyio.to_thread.run_sync(dbos_replay, k))
                        print(f"  DBOS K={k:,}: recovered in {dbos_samples[-1].replay_s:.3f} s", flush=True)
                report_dbos_replay(samples, dbos_samples)
        report_targets(results, args.steps, samples, dbos_walls)

        if args.profile:
            await profile_steps(replay_target, 1000, 25)
    finally:
        with anyio.CancelScope(shield=True):
            await close_stores()


# -- DBOS Transact, side by side (bench/dbos_side.py, one process per measurement) ---------------------------------

DBOS_SIDE = Path(__file__).resolve().parent / "dbos_side.py"


def dbos_run(*args: str) -> dict[str, Any]:
    """Run one dbos_side.py measurement; returns the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, str(DBOS_SIDE), *args], capture_output=True, text=True, timeout=3600, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"dbos_side.py {args[0]} failed ({out.returncode}): {out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def dbos_steps(steps: Sequence[int]) -> dict[str, float]:
    """Median wall seconds of a DBOS workflow of N trivial async steps, by N (including N = 0)."""
    db = tempfile.mkdtemp(prefix="wfbench-dbos-")
    try:
        walls: dict[str, float] = dbos_run("steps", "--db", db, "--steps", ",".join(map(str, steps)))["walls"]
        return walls
    finally:
        shutil.rmtree(db, ignore_errors=True)


def dbos_replay(k: int) -> ReplaySample:
    """A DBOS run of K steps whose process dies after the last step, recovered by the next DBOS.launch()."""
    db = tempfile.mkdtemp(prefix="wfbench-dbos-")
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(DBOS_SIDE), "build", "--db", db, "--k", str(k)], capture_output=True,
                       timeout=3600, check=False)  # fmt: skip
        build = time.perf_counter() - t0
        got = dbos_run("recover", "--db", db, "--k", str(k))
        return ReplaySample(k, build, got["recovered_s"], float("nan"))
    finally:
        shutil.rmtree(db, ignore_errors=True)


def report_targets(
    results: Sequence[ServerResult], steps: Sequence[int], replays: Sequence[ReplaySample],
    dbos: list[dict[str, float]],
) -> None:  # fmt: skip
    """The issue's targets, each with the figures it is judged on (the first server: embedded, everysec)."""
    res, n = results[0], max(steps)
    base = median([s.wall for s in res.runs[0]])
    mean_step = median([(s.wall - base) / n * 1e6 for s in res.runs[n]])
    in_run = [s.step_median_us for s in res.runs[n] if s.step_median_us is not None]
    median_step = median(in_run) if in_run else float("nan")
    rows = []
    for kind, name in (("xadd", "raw XADD (redis-py)"), ("xadd_lane", "raw XADD (fast lane)"),
                       ("append_step", "append() script (fast lane)")):  # fmt: skip
        by_median, by_mean = median_step / res.raw(kind), mean_step / res.raw_mean(kind)
        verdict = "met" if max(by_median, by_mean) <= 1.5 else "met by median" if by_median <= 1.5 else "missed"
        rows.append([
            f"step / {name} <= 1.5x", f"{by_median:.2f}x (median {fmt(median_step)} / {fmt(res.raw(kind))} µs)",
            f"{by_mean:.2f}x (mean {fmt(mean_step)} / {fmt(res.raw_mean(kind))} µs)", verdict,
        ])  # fmt: skip
    if dbos:
        theirs = median([(w[str(n)] - median([x["0"] for x in dbos])) / n * 1e6 for w in dbos])
        rows.append([
            ">= 10x faster per step than DBOS", f"{theirs / mean_step:.1f}x ({fmt(theirs)} / {fmt(mean_step)} µs)", "",
            "met" if theirs / mean_step >= 10 else "missed",
        ])  # fmt: skip
    by_k = {k: [s for s in replays if s.k == k] for k in sorted({s.k for s in replays})}
    if by_k:
        k = max(by_k)
        seconds = median([s.replay_s for s in by_k[k]])
        mib = median([s.extra_mib for s in by_k[k]])
        # Linear: each step beyond the smallest K costs the same; the fixed cost of a run (acquire,
        # finish: a few ms) is left out by comparing K values' differences, not their totals.
        times = [(kk, median([s.replay_s for s in mine])) for kk, mine in by_k.items()]
        marginal = [(t2 - t1) / (k2 - k1) * 1e6 for (k1, t1), (k2, t2) in itertools.pairwise(times)]
        linear = max(marginal) / min(marginal) if marginal and min(marginal) > 0 else float("nan")
        rows.append([
            f"{k:,}-step replay <= 1 s, <= 100 MiB", f"{seconds:.3f} s, {fmt(mib)} MiB", "",
            ("met" if k >= 100_000 else f"met at K = {k:,}") if seconds <= 1 and mib <= 100 else "missed",
        ])  # fmt: skip
        spans = ", ".join(f"{fmt(m, 2)}" for m in marginal)
        rows.append([
            "replay linear in steps", f"µs per extra step between successive K: {spans} ({linear:.2f}x)",
            "", "met" if linear <= 1.5 else "check",
        ])  # fmt: skip
    print_table(
        f"Targets (issue 6), server: {res.target.label} ({res.target.version}), N = {n}",
        ["target", "by medians", "by means", "verdict"],
        rows,
        [
            "by medians: the median single step timed inside the workflow / the raw call's median.",
            "by means: the marginal per-step cost (a mean, first table) / the raw call's mean (total / calls).",
            "The throughput target (>= 20x DBOS's workflows/s with 2 workers) is bench/throughput.py's.",
        ],
        left=1,
    )


def report_dbos_steps(res: ServerResult, dbos: list[dict[str, float]], steps: Sequence[int]) -> None:
    base = median([s.wall for s in res.runs[0]])
    dbos_base = median([w["0"] for w in dbos])
    rows = []
    for n in steps:
        ours = median([(s.wall - base) / n * 1e6 for s in res.runs[n]])
        theirs_all = [(w[str(n)] - dbos_base) / n * 1e6 for w in dbos]
        theirs = median(theirs_all)
        rows.append([
            str(n), fmt(ours), fmt(theirs), f"{fmt(min(theirs_all))} .. {fmt(max(theirs_all))}", ratio(theirs, ours),
        ])  # fmt: skip
    rows.append([
        "0 (whole run)", fmt(base * 1e6), fmt(dbos_base * 1e6), "", ratio(dbos_base, base),
    ])  # fmt: skip
    print_table(
        f"Side by side: DBOS Transact {package_version('dbos')} on SQLite, per-step µs (same method, same run)",
        ["N", f"werkfluss ({res.target.label}) µs", "DBOS µs", "DBOS min .. max", "DBOS / werkfluss"],
        rows,
        [
            "DBOS: @DBOS.workflow chaining N @DBOS.step async def noop(i), its default SQLite system database in",
            "  a temp dir, one process per repetition (bench/dbos_side.py steps), interleaved with werkfluss's.",
            "  Per-step cost = (median wall of N-step runs - median wall of 0-step runs) / N, as for werkfluss.",
        ],
        left=1,
    )


def report_dbos_replay(ours: Sequence[ReplaySample], dbos: Sequence[ReplaySample]) -> None:
    rows = []
    for k in sorted({s.k for s in dbos}):
        mine = [s.replay_s for s in ours if s.k == k]
        theirs = [s.replay_s for s in dbos if s.k == k]
        a, b = median(mine), median(theirs)
        rows.append([
            f"{k:,}", fmt(a, 3), fmt(a / k * 1e6), fmt(b, 3), fmt(b / k * 1e6),
            fmt(median([s.build_s for s in dbos if s.k == k]), 1), ratio(b, a),
        ])  # fmt: skip
    print_table(
        "Side by side: resuming a run of K recorded steps (werkfluss replay vs DBOS recovery)",
        ["K", "werkfluss s", "µs/step", "DBOS s", "µs/step", "DBOS build s", "DBOS / werkfluss"],
        rows,
        [
            "werkfluss: the replay table above (a failed run started again). DBOS: a process runs K steps and dies",
            "  (os._exit) before the workflow returns; the next process's DBOS.launch() recovers the PENDING run,",
            "  replays the K recorded steps and completes it. DBOS s: from calling launch() to the recovered",
            "  workflow body's return (in that process; get_result() polls and returns later).",
        ],
        left=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per configuration (default 5)")
    parser.add_argument("--steps", type=parse_ints, default=[1, 10, 100, 1000], help="N values (default 1,10,100,1000)")
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per raw round-trip figure")
    parser.add_argument("--redis-url", help="benchmark this Redis instead of starting Debian's redis-server")
    parser.add_argument("--replay", type=parse_ints, default=None, help="K values (default 1000,10000,100000)")
    parser.add_argument("--quick", action="store_true", help="replay 1k and 10k steps only")
    parser.add_argument("--no-fsync-always", action="store_true", help="skip the embedded fsync=always server")
    parser.add_argument("--profile", action="store_true", help="cProfile a 1000-step run (top 25 functions)")
    parser.add_argument("--no-dbos", action="store_true", help="skip the DBOS Transact side-by-side tables")
    parser.add_argument(
        "--dbos-max-replay", type=int, default=10_000, help="largest K replayed with DBOS (default 10000)"
    )
    args = parser.parse_args()
    args.dbos = not args.no_dbos and importlib.util.find_spec("dbos") is not None
    if not args.no_dbos and not args.dbos:
        print("DBOS: not importable in this environment, so its tables are skipped (pip install dbos to add them)")
    if args.replay is None:
        args.replay = [1000, 10_000] if args.quick else [1000, 10_000, 100_000]
    if not args.steps or min(args.steps) < 1:
        parser.error("--steps needs positive integers")

    print(
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.platform()}), "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"redis-py {redis.__version__}, hiredis {package_version('hiredis')}, anyio {package_version('anyio')}, "
        f"msgspec {msgspec.__version__}, werkfluss {package_version('werkfluss')}, psutil {package_version('psutil')}"
    )

    targets: list[Target] = []
    cleanup: list[Callable[[], None]] = []
    t_start = time.perf_counter()
    try:
        for mode in ("everysec", "always"):
            if mode == "always" and args.no_fsync_always:
                continue
            embedded = Embedded(mode, fsync=mode, start=False)  # the store starts it, as in an application
            cleanup.append(embedded.close)
            label = "embedded" if mode == "everysec" else "embedded fsync=always"
            targets.append(Target(label, embedded.settings, embedded_dir=embedded.dir))
        if args.redis_url:
            prefix = f"wfbench-{uuid.uuid4().hex[:8]}:"
            targets.append(Target("redis-url", Settings(redis_url=args.redis_url, prefix=prefix)))
            cleanup.append(lambda: _delete_prefix(args.redis_url, prefix))
        else:
            binary = shutil.which("redis-server") or (
                "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
            )
            if binary is None:
                print("redis-server not found: skipping the Debian redis-server rows (apt-get install redis-server)")
            else:
                server = DebianRedis(binary)
                cleanup.append(server.stop)
                url = server.start()
                assert server.proc is not None
                targets.append(Target("debian redis", Settings(redis_url=url), pid=server.proc.pid))
        anyio.run(run_all, args, targets, backend="asyncio")
    finally:
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception as exc:
                print(f"cleanup failed: {exc}", file=sys.stderr)
    print(f"\ntotal time: {time.perf_counter() - t_start:.0f} s")


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


if __name__ == "__main__":
    main()
