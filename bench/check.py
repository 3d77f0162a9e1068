"""The pre-deploy check at scale (issue 18): ``werkfluss check`` over N in-flight runs of 20 steps.

Run from the repository root (see bench/README.md):

    python bench/check.py                              # 1,000 and 10,000 runs, embedded Valkey and Debian's Redis
    python bench/check.py --runs 10000 --servers embedded

Each measurement: a fresh server (the embedded Valkey, or Debian's ``redis-server`` when
installed), 2 worker processes (``werkfluss worker check_flows``), N runs of
``check_flows.order`` enqueued by 8 concurrent callers: real runs, each executing its 20
steps and pausing on a hook nobody delivers. Once every run is paused, the workers stop,
and ``werkfluss check check_flows --json`` runs as a process of its own (twice; exit code 0): it lists
the runs a page at a time, reads each log, replays it without executing a step and
decodes each recorded result to its annotation (a msgspec Struct).

Figures: the check's wall time (the process's, import included), runs checked per second,
and the check process's peak RSS (its VmHWM) next to the peak RSS of a
process that only imports werkfluss and the module: the check's own memory is the
difference, and it must not grow with N. Every run must be reported clean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anyio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import check_flows  # noqa: E402  (the workers import it by this name too)
from _common import DebianRedis, Embedded, parse_ints, start_processes, stop_processes  # noqa: E402
from tables import fmt, print_table  # noqa: E402

from werkfluss import Settings, enqueue_async  # noqa: E402
from werkfluss._store._open import close_stores, open_store  # noqa: E402

ENQUEUERS = 8
WORKERS = 2


@dataclass
class Figures:
    """One measurement."""

    server: str
    runs: int
    create_s: float = float("nan")
    check_s: list[float] = field(default_factory=list)  # wall seconds per check process
    rss_mb: list[float] = field(default_factory=list)  # peak RSS per check process
    base_rss_mb: float = float("nan")  # peak RSS of a process that only imports
    clean: int = 0


# The process reports its own high-water RSS (VmHWM: this image's, reset by exec; ru_maxrss
# would count the pages of the forked bench process before the exec).
_HWM = "import sys\n{body}\nsys.stderr.write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
CHECK = _HWM.format(body="from werkfluss._cli import main\ncode = main(sys.argv[1:])")
IMPORT_ONLY = _HWM.format(body="import werkfluss, werkfluss._cli, check_flows")


def _run(code: str, args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run `code` in a fresh interpreter; its wall seconds, its peak RSS in MB, its stdout."""
    begun = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=BENCH, env=env, capture_output=True, check=False)
    wall = time.perf_counter() - begun
    err = done.stderr.decode(errors="replace")
    hwm = [line for line in err.splitlines() if line.startswith("VmHWM")]
    if done.returncode != 0 or not hwm:
        raise RuntimeError(f"{args[:3]} exited with {done.returncode}: {err[-2000:]}")
    return wall, int(hwm[-1].split()[1]) / 1024, done.stdout.decode()


def measure(kind: str, runs: int, repeat: int, patience: float) -> Figures:
    logs = Path(tempfile.mkdtemp(prefix="wf-check-"))
    marks = logs / "done"
    embedded: Embedded | None = None
    debian: DebianRedis | None = None
    if kind == "embedded":
        embedded = Embedded("check")
        settings, env = embedded.settings, embedded.env()
    else:
        binary = shutil.which("redis-server")
        assert binary is not None
        debian = DebianRedis(binary)
        url = debian.start()
        prefix = f"wfcheck-{uuid.uuid4().hex[:6]}:"
        settings = Settings(redis_url=url, prefix=prefix)
        env = {**os.environ, "WERKFLUSS_REDIS_URL": url, "WERKFLUSS_PREFIX": prefix}
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(BENCH), os.environ.get("PYTHONPATH", "")] if p)
        env.pop("WERKFLUSS_DIR", None)
    figures = Figures(kind, runs)
    procs = []
    try:
        argv = [sys.executable, "-m", "werkfluss", "worker", "check_flows", "--concurrency", "64",
                "--log-level", "WARNING"]  # fmt: skip
        procs = start_processes(argv, {**env, "WF_CHECK_DONE": str(marks)}, WORKERS, "serving", logs)
        begun = time.perf_counter()

        async def create() -> None:
            try:
                numbers = iter(range(runs))

                async def caller() -> None:
                    for n in numbers:
                        await enqueue_async(check_flows.order.options(settings=settings, run_id=f"o-{n}"), f"o-{n}")

                async with anyio.create_task_group() as tg:
                    for _ in range(ENQUEUERS):
                        tg.start_soon(caller)
                deadline = time.monotonic() + patience
                while not marks.exists() or len(marks.read_text().splitlines()) < runs:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the {runs} runs did not get through their steps in {patience:.0f} s")
                    await anyio.sleep(0.5)  # polling the workers' progress file, not synchronising
                store = await open_store(settings)
                left = [f"o-{n}" for n in range(runs)]
                while left:  # through their last step: now each pauses on its hook
                    left = [r for r in left if await store.status(r) != "paused"]
                    if left and time.monotonic() > deadline:
                        raise RuntimeError(f"{len(left)} runs did not pause in {patience:.0f} s")
            finally:
                await close_stores()

        anyio.run(create)
        figures.create_s = time.perf_counter() - begun
        stop_processes(procs)
        procs = []
        figures.base_rss_mb = _run(IMPORT_ONLY, [], env)[1]
        for _ in range(repeat):
            wall, rss, text = _run(CHECK, ["check", "check_flows", "--json"], env)
            answer = json.loads(text)
            counts = answer["counts"]
            if counts["checked"] != runs or counts["clean"] != runs:
                raise RuntimeError(f"the check saw {counts}, not {runs} clean runs")
            figures.clean = counts["clean"]
            figures.check_s.append(wall)
            figures.rss_mb.append(rss)
        return figures
    finally:
        stop_processes(procs)
        if embedded is not None:
            embedded.close()
        if debian is not None:
            debian.stop()
        shutil.rmtree(logs, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=parse_ints, default=[1000, 10000], help="N values (default 1000,10000)")
    parser.add_argument("--servers", default="embedded,redis", help="embedded and/or redis (default both)")
    parser.add_argument("--repeat", type=int, default=2, help="check processes per measurement (default 2)")
    parser.add_argument("--patience", type=float, default=600, help="seconds to create the runs (default 600)")
    args = parser.parse_args()
    kinds = [k for k in args.servers.split(",") if k]
    if "redis" in kinds and shutil.which("redis-server") is None:
        print("Debian redis-server: not installed, so its rows are skipped", file=sys.stderr)
        kinds.remove("redis")
    rows = []
    for kind in kinds:
        for n in args.runs:
            f = measure(kind, n, args.repeat, args.patience)
            rows.append([
                f.server, f"{f.runs:,}", fmt(f.create_s), " / ".join(fmt(s, 2) for s in f.check_s),
                fmt(f.runs / min(f.check_s), 0), " / ".join(fmt(m) for m in f.rss_mb), fmt(f.base_rss_mb),
                fmt(max(f.rss_mb) - f.base_rss_mb), f"{f.clean:,}",
            ])  # fmt: skip
            print(f"{kind} {n}: {rows[-1]}", file=sys.stderr, flush=True)
    print_table(
        "werkfluss check over N in-flight runs of 20 steps (paused on a hook), one process",
        ["server", "runs", "create s", "check s", "runs/s", "peak RSS MB", "import-only MB", "check's own MB", "clean"],
        rows,
        notes=[
            "check s: wall time of each `werkfluss check check_flows --json` process (interpreter start and import "
            "included); runs/s from the faster one",
            "peak RSS: VmHWM of the check process; import-only: a process that imports werkfluss and the module; "
            "check's own: the larger peak minus that",
            f"runs created by {WORKERS} worker processes (concurrency 64), enqueued by {ENQUEUERS} concurrent callers",
        ],
    )


if __name__ == "__main__":
    main()
