"""A run started with `start()` whose script dies is resumed by a worker.

Real script processes SIGKILLed mid-step at a file barrier, real worker processes
(``werkfluss worker``), both servers. Every step execution appends a line to an
effect file (``<step> <pid>``), so the tests count executions and see who executed.

- The watchdog: a script's run carries a wake-up on the timer set for when its lease
  would run out; a worker that takes it finds the run busy while the script lives
  (and looks again later), or takes it over once the script is gone.
- The sweep: a run left stuck by an older version (running, nobody holding it, no
  wake-up, no queue message) is found by a worker that starts later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import msgspec
import pytest
import redis

from werkfluss import Settings, enqueue_async
from werkfluss._events import AnyEvent, RunResumed, Waiting, decode_event
from werkfluss._store._open import close_stores, open_store
from werkfluss._worker._recovery import sweep

from .conftest import ROOT, wait_for
from .faults.harness import report
from .workers import Workers, server_env

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from .conftest import Server

pytestmark = pytest.mark.slow

LEASE = 2.0  # seconds: short enough to wait out, long enough for a loaded machine to renew in time
RECOVERY_DEADLINE = LEASE + 15.0  # the watchdog comes due after a lease; the rest is a loaded machine's slack

FLOWS = """
import os
import time
from pathlib import Path

import anyio

from werkfluss import sleep, step, workflow


def effect(name: str) -> None:
    # One small O_APPEND write per execution: lines from several processes never interleave.
    fd = os.open(os.environ["EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{name} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)


async def barrier(point: str) -> None:
    # A process told to stop at `point` says so in its READY file, then waits for the
    # RELEASE file (forever without one: it is there to be killed).
    if os.environ.get("HOLD_AT") != point:
        return
    Path(os.environ["READY"]).write_text(str(os.getpid()))
    release = os.environ.get("RELEASE")
    while not (release and Path(release).exists()):
        await anyio.sleep(0.01)


@step
async def fetch(order: str) -> str:
    effect("fetch")
    return order.upper()


@step
async def charge(item: str) -> str:
    await barrier("charge")
    effect("charge")
    return f"charged {item}"


@workflow
async def checkout(order: str) -> str:
    return await charge(await fetch(order))


@workflow
async def nap_checkout(order: str, seconds: float) -> str:
    item = await fetch(order)
    await sleep(seconds)
    return await charge(item)
"""

SCRIPT = """
import sys

from recovery_flows import checkout
from werkfluss import start

print("starting", file=sys.stderr, flush=True)
print(start(checkout.options(run_id=sys.argv[1]), sys.argv[1]))
"""

NAP_SCRIPT = """
import sys

from recovery_flows import nap_checkout
from werkfluss import start

print(start(nap_checkout.options(run_id=sys.argv[1]), sys.argv[1], float(sys.argv[2])))
"""

Runner = Callable[..., "subprocess.Popen[str]"]


class Scene:
    """The flows module, the script, the effect file and the server of one test."""

    def __init__(self, tmp: Path, server: Server, prefix: str, run_script: Runner) -> None:
        (tmp / "recovery_flows.py").write_text(FLOWS)
        self.script = tmp / "checkout.py"
        self.script.write_text(SCRIPT)
        self.tmp = tmp
        self.effects = tmp / "effects"
        self.prefix = prefix
        self.run_script = run_script
        self.env = {"EFFECTS": str(self.effects), "WERKFLUSS_LEASE": str(LEASE)}
        self.client: redis.Redis = redis.Redis.from_url(server.url)
        # The scripts import the flows from their own directory; the workers need it on the path.
        worker_env = server_env(server, prefix, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp}", **self.env)
        self.workers = Workers(worker_env, tmp, module="recovery_flows", concurrency=4)
        self.scripts: list[subprocess.Popen[str]] = []

    def close(self) -> None:
        self.workers.stop_all()
        for proc in self.scripts:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        self.client.close()

    def start(self, run_id: str, **env: str) -> subprocess.Popen[str]:
        proc = self.run_script(self.script, run_id, env={**self.env, **env})
        self.scripts.append(proc)
        return proc

    def start_held(self, run_id: str) -> subprocess.Popen[str]:
        """A script of `run_id` stopped inside its charge step, before the effect."""
        ready = self.tmp / f"ready-{run_id}"
        proc = self.start(run_id, HOLD_AT="charge", READY=str(ready), RELEASE=str(self.tmp / f"release-{run_id}"))
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30, f"the script of {run_id} to reach its step")
        assert proc.poll() is None, proc.communicate()
        return proc

    def kill(self, proc: subprocess.Popen[str]) -> float:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return time.monotonic()

    def finish(self, proc: subprocess.Popen[str]) -> str:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return out.strip()

    def executions(self) -> list[tuple[str, int]]:
        if not self.effects.exists():
            return []
        return [(name, int(pid)) for name, pid in (line.split() for line in self.effects.read_text().splitlines())]

    def counts(self) -> Counter[str]:
        return Counter(name for name, _ in self.executions())

    def key(self, run_id: str) -> str:
        return f"{self.prefix}{{{run_id}}}:state"

    def state(self, run_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.client.hgetall(self.key(run_id))  # type: ignore[assignment]
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}

    def events(self, run_id: str) -> list[AnyEvent]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.client.xrange(f"{self.prefix}{{{run_id}}}:log")  # type: ignore[assignment]
        return [decode_event(fields[b"e"]) for _, fields in entries]

    def status(self, run_id: str) -> str:
        return self.state(run_id).get("status", "")

    def timer(self, run_id: str) -> float | None:
        return self.client.zscore(f"{self.prefix}{{q}}:timers", run_id)

    def server_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000


@pytest.fixture
def scene(tmp_path: Path, server: Server, prefix: str, run_script: Runner) -> Iterator[Scene]:
    made = Scene(tmp_path, server, prefix, run_script)
    yield made
    made.close()


def test_a_worker_finishes_the_run_of_a_script_sigkilled_mid_step_and_a_rerun_attaches_to_it(
    scene: Scene, server: Server
) -> None:
    # The worker stops inside the step too (before its effect), so that a rerun of the
    # script meets the run while the worker executes it.
    worker_ready = scene.tmp / "worker-ready"
    release = scene.tmp / "worker-release"
    worker = scene.workers.start(env={"HOLD_AT": "charge", "READY": str(worker_ready), "RELEASE": str(release)})
    victim = scene.start_held("order-1")
    assert scene.timer("order-1") is not None  # the watchdog, armed when the script took the run
    killed = scene.kill(victim)
    assert scene.counts() == {"fetch": 1}

    wait_for(worker_ready.exists, RECOVERY_DEADLINE, "the worker to take the run over")
    taken_after = time.monotonic() - killed
    assert scene.status("order-1") == "running"
    assert int(scene.state("order-1")["holder"].split("/")[1]) == worker.pid

    rerun = scene.start("order-1")
    assert rerun.stderr is not None and rerun.stderr.readline() == "starting\n"  # its start() follows at once
    release.write_text("go")
    assert scene.finish(rerun) == "charged ORDER-1"
    state = scene.state("order-1")
    assert state["status"] == "completed" and state["epoch"] == "2"  # the rerun attached, never took over
    assert scene.executions() == [("fetch", victim.pid), ("charge", worker.pid)]

    assert scene.finish(scene.start("order-1")) == "charged ORDER-1"  # recorded: nothing executes
    assert scene.counts() == {"fetch": 1, "charge": 1}
    wait_for(lambda: scene.timer("order-1") is None, 10, "no wake-up left for the completed run")
    report(
        f"start() run taken over by a worker after its script was SIGKILLed [{server.kind}]",
        lease_s=LEASE,
        taken_over_after_s=round(taken_after, 2),
        executions=dict(scene.counts()),
        rerun_result="charged ORDER-1",
    )
    assert taken_after <= RECOVERY_DEADLINE


def test_a_live_script_in_a_long_step_is_not_taken_over_while_workers_check_on_it(scene: Scene, server: Server) -> None:
    worker = scene.workers.start()
    script = scene.start_held("order-2")
    pid = script.pid
    began = time.monotonic()
    seen: set[float] = set()

    def armed_again() -> bool:
        # Each worker check that finds the script alive re-arms the wake-up for when the lease would run out.
        due = scene.timer("order-2")
        if due is not None:
            seen.add(due)
        return len(seen) >= 4

    wait_for(armed_again, 6 * LEASE + 15, "workers to check on the run several times")
    held = time.monotonic() - began
    assert script.poll() is None
    state = scene.state("order-2")
    assert state["status"] == "running" and state["epoch"] == "1"  # never taken over
    assert int(state["holder"].split("/")[1]) == pid

    (scene.tmp / "release-order-2").write_text("go")
    assert scene.finish(script) == "charged ORDER-2"
    assert scene.executions() == [("fetch", pid), ("charge", pid)]
    # A worker check racing the run's end may leave a wake-up behind: it finds the run completed.
    wait_for(lambda: scene.timer("order-2") is None, 3 * LEASE + 10, "no wake-up left for the completed run")
    assert "resumed" not in scene.workers.log(worker)
    report(
        f"live start() run in a long step, workers checking [{server.kind}]",
        lease_s=LEASE,
        held_s=round(held, 1),
        worker_checks=len(seen) - 1,
        checks_per_lease=round((len(seen) - 1) / (held / LEASE), 2),
        executions=dict(scene.counts()),
        takeovers=0,
    )


def test_runs_stuck_before_the_watchdog_are_recovered_by_a_worker_that_starts_later(
    scene: Scene, server: Server, settings: Settings
) -> None:
    timers = f"{scene.prefix}{{q}}:timers"

    def stuck(run_id: str) -> subprocess.Popen[str]:
        # What an older version leaves: acquired, then SIGKILLed, and no wake-up anywhere.
        proc = scene.start_held(run_id)
        scene.client.zrem(timers, run_id)
        scene.kill(proc)
        return proc

    dead_here = stuck("order-3")  # its holder's PID is gone on this host
    stuck("order-4")
    stuck("order-5")
    # order-4: held from another machine, its lease long run out. order-5: held from another
    # machine that renews it; the sweep must leave it alone.
    scene.client.hset(scene.key("order-4"), mapping={"holder": "elsewhere000/4242/abc.1", "lease": 1})
    scene.client.hset(
        scene.key("order-5"), mapping={"holder": "elsewhere000/4243/abc.1", "lease": scene.server_ms() + 600_000}
    )
    # order-6: an enqueue that died between creating its run and queueing it.
    anyio.run(_enqueue_without_message, settings, "order-6")
    scene.client.hset(scene.key("order-6"), "updated", 1)
    for run_id in ("order-3", "order-4", "order-5"):
        assert scene.status(run_id) == "running" and scene.timer(run_id) is None
    assert scene.status("order-6") == "pending" and scene.client.xlen(f"{scene.prefix}{{q}}:queue") == 0
    assert scene.counts() == {"fetch": 3}

    began = time.monotonic()
    worker = scene.workers.start()
    wait_for(lambda: "woke 3 that nobody was executing" in scene.workers.log(worker), 30, "the sweep")
    wait_for(lambda: all(scene.status(r) == "completed" for r in ("order-3", "order-4", "order-6")), 30, "the recovery")
    recovered = time.monotonic() - began
    assert "swept 4 runs" in scene.workers.log(worker)
    assert scene.counts() == {"fetch": 4, "charge": 3}
    assert [pid for name, pid in scene.executions() if name == "charge"] == [worker.pid] * 3
    assert scene.status("order-5") == "running" and scene.timer("order-5") is None  # left to its live holder
    assert scene.finish(scene.start("order-3")) == "charged ORDER-3"
    assert scene.counts() == {"fetch": 4, "charge": 3}
    assert dead_here.returncode == -signal.SIGKILL
    report(
        f"runs stuck before the watchdog, recovered by a worker that starts later [{server.kind}]",
        stuck=3,
        left_to_a_live_holder=1,
        recovered_after_start_s=round(recovered, 2),
        executions=dict(scene.counts()),
    )


def test_a_pause_replaces_the_watchdog_and_the_end_removes_the_wake_up(scene: Scene, server: Server) -> None:
    script = scene.tmp / "nap.py"
    script.write_text(NAP_SCRIPT)
    proc = scene.run_script(script, "order-7", str(3 * LEASE), env=scene.env)
    scene.scripts.append(proc)
    wait_for(lambda: scene.status("order-7") == "paused" or proc.poll() is not None, 30, "the run to pause")
    raw = scene.client.hget(scene.key("order-7"), "waiting")
    assert isinstance(raw, bytes)
    waits = msgspec.msgpack.decode(raw, type=list[Waiting])
    due = min(w.due for w in waits if w.due is not None)
    # The sleep's timer replaces the watchdog's sooner wake-up (one round trip after the pause is
    # recorded, well before the watchdog would come due): nothing looks at the paused run early.
    wait_for(lambda: scene.timer("order-7") == int(due * 1000), LEASE / 2, "the sleep's timer")
    assert scene.finish(proc) == "charged ORDER-7"  # the script resumes its own run when the timer is due
    assert scene.timer("order-7") is None
    assert scene.executions() == [("fetch", proc.pid), ("charge", proc.pid)]
    assert [type(e) for e in scene.events("order-7")].count(RunResumed) == 1  # once, when the timer came due
    report(f"start() run that pauses: its wake-up is the timer's [{server.kind}]", watchdog_left_after_end=0)


async def _enqueue_without_message(settings: Settings, run_id: str) -> None:
    import recovery_flows  # type: ignore[import-not-found]  # written by the test, on sys.path below

    try:
        await enqueue_async(recovery_flows.checkout.options(run_id=run_id, settings=settings), run_id)
        store = await open_store(settings)
        await store.client.delete(store.queue_key("queue"))
    finally:
        await close_stores()


@pytest.fixture(autouse=True)
def _flows_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))


# -- the sweep, in this process ----------------------------------------------------------------------------------------


@pytest.fixture
async def store_settings(settings: Settings) -> AsyncIterator[Settings]:
    yield settings
    await close_stores()


async def test_the_sweep_reads_every_run_once_across_equal_creation_times_and_wakes_none_that_live(
    store_settings: Settings, server: Server
) -> None:
    store = await open_store(store_settings)
    runs = 1000
    pipe = store.client.pipeline(transaction=False)
    for i in range(runs):
        # Pending runs just created (their enqueue is writing the message): not stuck.
        pipe.hset(store.key(f"r-{i}", "state"), mapping={"status": "pending", "updated": int(time.time() * 1000)})
        # Runs of one millisecond share a score: groups of 300 cross the batches of 200.
        pipe.zadd(store.runs_key, {f"r-{i}": 1_000 + i // 300})
    await pipe.execute()
    done = await sweep(store, 10.0, set(), stopping=lambda: False)
    assert (done.scanned, done.woken) == (runs, 0)
    assert await store.client.zcard(store.queue_key("timers")) == 0

    # What the watchdog adds to each start() run: a wake-up as it takes the run, its removal at the end.
    rounds = 500
    began = time.perf_counter()
    for i in range(rounds):
        await store.wake(f"r-{i}", 10)
        await store.unschedule(f"r-{i}")
    watchdog = (time.perf_counter() - began) / rounds
    report(
        f"sweep of the run index [{server.kind}]",
        runs=runs,
        ms_per_1000_runs=round(done.seconds / runs * 1000 * 1000, 1),
        watchdog_us_per_start_run=round(watchdog * 1e6, 1),
    )
