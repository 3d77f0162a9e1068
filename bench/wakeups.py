"""Wake-ups: how soon a hook delivery reaches a worker, and what idle workers cost the server.

Run from the repository root (see bench/README.md):

    python bench/wakeups.py                  # 1 and 4 workers, 200 wake-ups each, 20 s idle
    python bench/wakeups.py --wakeups 50 --idle 10

Latency: a run of ``wake_flows.probe`` parks on a hook; this process delivers the
hook with `invoke_hook_async` and notes the time just before; the step after the
hook returns the time it started. Both times come from this machine's one clock.
One run at a time, so each wake-up meets idle workers.

Idle cost: the workers serve nothing for `--idle` seconds; the server's
``INFO commandstats`` before and after give the commands they sent, per worker
and second. Commands a script runs inside the server count there too: they are
listed apart ("inside scripts"), since no client sent them.

Workers are ``werkfluss worker wake_flows`` processes on the embedded Valkey (a
fresh key prefix per measurement), and next to it a raw round trip (PING) from
this process, so the figures can be read against this machine's speed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import msgspec

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import wake_flows  # noqa: E402  (the workers import it by this name too)
from _common import Embedded, percentile, start_processes, stop_processes, worker_env  # noqa: E402
from tables import fmt, print_table  # noqa: E402

from werkfluss import Settings, enqueue_async, invoke_hook_async  # noqa: E402
from werkfluss._store._open import close_stores, open_store  # noqa: E402

# What idle workers send themselves, as opposed to what their scripts run inside the server.
CLIENT_COMMANDS = {"evalsha", "eval", "xreadgroup", "blpop", "ping", "zadd", "xadd", "hgetall", "hello", "client",
                   "info", "xgroup", "script", "zmscore", "zrem", "hdel", "hget", "hset", "select", "auth"}  # fmt: skip


async def commandstats(settings: Settings) -> dict[str, int]:
    store = await open_store(settings)
    info = await store.client.info("commandstats")
    return {name.removeprefix("cmdstat_").lower(): int(v["calls"]) for name, v in info.items()}


async def ping_us(settings: Settings, n: int = 200) -> float:
    store = await open_store(settings)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await store.client.ping()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


async def wake_latencies(settings: Settings, count: int) -> list[float]:
    store = await open_store(settings)
    latencies = []
    for i in range(count):
        token = f"wake-{uuid.uuid4().hex[:8]}-{i}"
        run_id = await enqueue_async(wake_flows.probe.options(settings=settings), token)
        with anyio.fail_after(30):
            while await store.status(run_id) != "paused":  # noqa: ASYNC110 - another process parks it
                await anyio.sleep(0.005)
        sent = time.time()
        await invoke_hook_async(token, i, settings=settings)
        with anyio.fail_after(30):
            while await store.status(run_id) != "completed":  # noqa: ASYNC110 - another process ends it
                await anyio.sleep(0.005)
        started = msgspec.msgpack.decode((await store.state(run_id)).result or b"")
        latencies.append((started - sent) * 1000)
    return latencies


def measure(directory: Path, workers: int, wakeups: int, idle: float) -> dict[str, object]:
    prefix = f"wk{uuid.uuid4().hex[:8]}:"
    settings = Settings(directory=str(directory), prefix=prefix)
    env = worker_env(directory, prefix)
    logs = Path(tempfile.mkdtemp(prefix="wf-wake-"))
    argv = [sys.executable, "-m", "werkfluss", "worker", "wake_flows", "--log-level", "INFO"]
    procs = start_processes(argv, env, workers, "serving", logs)
    try:

        async def main() -> dict[str, object]:
            try:
                await anyio.sleep(2.0)  # settle: every worker reached its steady loop
                before = await commandstats(settings)
                await anyio.sleep(idle)
                after = await commandstats(settings)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                delta["info"] = delta.get("info", 0) - 1  # our own second INFO
                sent = {k: v for k, v in delta.items() if v > 0 and k in CLIENT_COMMANDS}
                inside = {k: v for k, v in delta.items() if v > 0 and k not in CLIENT_COMMANDS}
                rtt = await ping_us(settings)
                latencies = await wake_latencies(settings, wakeups)
                return {"sent": sent, "inside": inside, "latencies": latencies, "rtt_us": rtt}
            finally:
                await close_stores()

        return anyio.run(main)
    finally:
        stop_processes(procs)
        shutil.rmtree(logs, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--wakeups", type=int, default=200)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the workers stay idle")
    parser.add_argument("--label", default="", help="a name for this build in the table title")
    args = parser.parse_args()
    server = Embedded("wake")
    directory = server.dir
    rows, notes = [], []
    try:
        for workers in args.workers:
            got = measure(directory, workers, args.wakeups, args.idle)
            lat: list[float] = got["latencies"]  # type: ignore[assignment]
            sent: dict[str, int] = got["sent"]  # type: ignore[assignment]
            inside: dict[str, int] = got["inside"]  # type: ignore[assignment]
            per = args.idle * workers
            blocking = sent.get("xreadgroup", 0) + sent.get("blpop", 0)
            rows.append([
                str(workers), fmt(percentile(lat, 0.5), 2), fmt(percentile(lat, 0.99), 2), fmt(max(lat), 2),
                fmt(sum(sent.values()) / per, 2), fmt(sent.get("xreadgroup", 0) / per, 2),
                fmt((sum(sent.values()) - sent.get("xreadgroup", 0)) / per, 2), fmt(blocking / per, 2),
                fmt(got["rtt_us"], 0),  # type: ignore[arg-type]
            ])  # fmt: skip
            notes.append(f"{workers} worker(s), idle: sent {dict(sorted(sent.items()))}; "
                         f"inside scripts {dict(sorted(inside.items()))}")  # fmt: skip
    finally:
        server.close()
    print_table(
        f"Wake-ups and idle cost{' (' + args.label + ')' if args.label else ''}, embedded Valkey",
        [
            "workers",
            "wake p50 ms",
            "wake p99 ms",
            "wake max ms",
            "idle cmd/s/worker",
            "of which XREADGROUP",
            "besides XREADGROUP",
            "blocking reads/s",
            "PING us",
        ],
        rows,
        [f"{args.wakeups} wake-ups per row: hook delivered -> the next step starts; idle over {args.idle:g} s", *notes],
    )


if __name__ == "__main__":
    main()
