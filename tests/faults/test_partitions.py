"""R-12: a worker cut off by a network partition (packets dropped, no RST) while it records a
step; a worker on a healthy path claims the run; after healing, the cut-off worker's late
write must be refused by the fence.

Worker Z reaches Debian's redis-server through the fault proxy, worker H directly. Z stops
at a barrier inside step 2 after the step's effect; the proxy starts dropping everything;
Z's step returns and its ``StepCompleted`` append goes into the partition. H claims the
run after the lease, executes step 2 again (the effect sink drops the repeat) and finishes
the run. Then the partition heals, either with the held packets delivered late ("heal") or
with Z's connections reset first, so that redis-py re-sends the append on a new connection
("reset"). Either way the server must refuse it: one completion per step.

Z gives its write up by itself, without the heal: no renewal of its lease gets through, and
once the lease has run out (before H can claim the run) Z abandons the write and stops the
run (``RunExecutor._keep_lease``); a write waits ``CALL_DEADLINE`` (10 s) at most anyway. So a
late write is one whose bytes were already on their way: with "heal" they were held in the
partition and reach the server after H's completion even though Z closed its connection
(``FaultProxy.late_bytes_upstream`` counts them), and the fence must refuse them.

``WF_FAULT_PARTITION=60`` keeps the partition up that many seconds (RELIABILITY.md's 60 s);
by default it heals as soon as H is done. `test_r12_a_blackholed_worker_notices_within_its_bound`
measures how soon Z notices, on both of its paths: the lease and the deadline of one call.

The embedded Valkey is not blackholed: in embedded mode a worker connects to the unix socket
in the server's data directory itself, so the TCP proxy cannot sit in between, and a unix
socket has no network that could drop packets (its peer is in the same kernel, which delivers
at once or reports the peer gone). The nearest fault there is a server that stops answering
without closing anything (SIGSTOP): `test_r12_a_frozen_embedded_server_is_noticed_within_the_bound`.

Also here, since it needs the proxy: an R-07 outage at a precise point, the server
unreachable from the moment a step returns until its write gives up.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import anyio
import msgspec
import pytest

from werkfluss import Settings
from werkfluss._errors import StorageError
from werkfluss._store import CALL_DEADLINE, SOCKET_TIMEOUT, RedisStore
from werkfluss._store._embedded import ensure_server, stop_server

from ..conftest import ROOT
from ..servers import RedisProcess, require_binary
from . import flows
from .harness import DEADLINE, LEASE, Faults, Write, report
from .proxy import FaultProxy

PARTITION = float(os.environ.get("WF_FAULT_PARTITION", "0"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120 + 2 * PARTITION)]


# The bound README.md documents for a worker cut off from the store: its run stops once its lease
# has gone unrenewed, and no call waits longer than CALL_DEADLINE, whichever comes first.
NOTICE_WITHIN = min(LEASE, CALL_DEADLINE)
# What a loaded 2-core machine may add to a bound: scheduling, the lease's renewal cadence.
SLACK = 1.5


def cut_off_after_the_effect(
    faults: Faults, proxy: FaultProxy, run_id: str, args: tuple[int]
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], float]:
    """Worker Z (through `proxy`) stops inside step 2 of run `run_id` after the step's effect; a
    worker H on a healthy path starts; the proxy starts dropping everything; Z goes on, cut off.

    Returns Z, H and when the partition began.
    """
    step_2 = f"{run_id}:2"
    zombie = faults.workers.start(env={"WERKFLUSS_REDIS_URL": proxy.url()})
    faults.arm("after-effect", step_2)
    faults.enqueue(flows.order, [(run_id, args)])
    assert faults.wait_reached("after-effect", step_2) == zombie.pid
    healthy = faults.workers.start()
    proxy.blackhole()
    cut_at = time.time()
    faults.release("after-effect", step_2)
    return zombie, healthy, cut_at


@pytest.mark.parametrize("heal", ["heal", "reset"])
def test_r12_a_partitioned_worker_is_fenced_out_after_healing(tmp_path: Path, prefix: str, heal: str) -> None:
    require_binary("redis-server")
    with (
        RedisProcess(tmp_path / "redis", "--appendonly", "yes") as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        env = {**os.environ, "WERKFLUSS_REDIS_URL": server.url, "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
        env.pop("WERKFLUSS_DIR", None)
        settings = Settings(redis_url=server.url, prefix=prefix, lease=LEASE)
        faults = Faults(tmp_path / "faults", env, server.url, settings, kind="redis")
        try:
            run_id, step_2 = "partitioned", "partitioned:2"
            calls = {run_id: (7,), "after": (8,)}
            reference = faults.reference(flows.order, calls)
            zombie, healthy, cut_at = cut_off_after_the_effect(faults, proxy, run_id, calls[run_id])
            target = f"append@{run_id}#c2"
            faults.wait(lambda: any(w.pid == zombie.pid for w in faults.writes(target)), "Z to send its completion")
            faults.wait_status([run_id])  # H took over and finished while Z's write hangs in the partition
            taken_over = next(e.time for e in faults.resumes(run_id) if f"/{healthy.pid}/" in e.holder)
            if PARTITION:
                time.sleep(max(0.0, cut_at + PARTITION - time.time()))  # the fault's length, not a synchronisation
            if heal == "reset":
                proxy.reset()
            proxy.blackhole(False)
            healed_at = time.time()

            def zombie_answered() -> bool:
                return all(w.outcome is not None for w in faults.writes(target) if w.pid == zombie.pid)

            faults.wait(zombie_answered, "Z's late write to be answered")
            if heal == "heal" and proxy.held_bytes_upstream:
                # Z closed its connections when it gave up, but what it sent into the partition was held there
                # and reaches the server now, behind H's completion: the fence (and first writer wins) refuse it.
                # (When Z's write went out on a connection it opened during the partition, nothing was held:
                # the proxy never read it.)
                faults.wait(lambda: proxy.late_bytes_upstream > 0, "Z's held bytes to reach the server")
            zombie_writes = [
                w for w in faults.writes() if w.pid == zombie.pid and w.target.split("@")[1].startswith(run_id)
            ]
            late = [w for w in zombie_writes if w.done is not None and w.done > taken_over]
            landed = [w for w in late if w.outcome == "ok"]
            assert landed == [], f"writes of the fenced-out worker landed: {landed}"
            ours = [w for w in faults.writes(target) if w.pid == healthy.pid]
            assert [w.outcome for w in ours] == ["ok"] and int(ours[0].reply or 0) > 0, "H's completion was recorded"
            charge_runs = Counter(r.pid for r in faults.ledger("exec") if r.key == step_2)
            assert charge_runs == {zombie.pid: 1, healthy.pid: 1}

            # Z survived and serves: with H gone, only Z can finish the next run.
            faults.workers.kill(healthy)
            faults.enqueue(flows.order, [("after", calls["after"])])
            faults.wait_status(["after"])
            assert {r.pid for r in faults.ledger("exec") if r.key.startswith("after:")} == {zombie.pid}
            figures = faults.check(reference.result(DEADLINE))
            # Given up (cancelled when the lease lapsed, or failed at the call's deadline) before the heal.
            detected = [w.done for w in zombie_writes if w.done and w.outcome != "ok" and w.done < healed_at]
            report(
                f"R-12 partition then {heal} [redis]",
                **figures,
                partition_s=round(healed_at - cut_at, 3),
                takeover_after_cut_s=round(taken_over - cut_at, 3),
                dead_socket_detected_after_s=round(min(detected) - cut_at, 3) if detected else "not within partition",
                zombie_writes_attempted=len(late),
                zombie_writes_rejected=len(late) - len(landed),
                zombie_write_outcomes=dict(Counter(w.outcome for w in late)),
                heal_to_refusal_s=max(0.0, round(max(w.done for w in late if w.done) - healed_at, 3)) if late else None,
                late_bytes_reaching_server=proxy.late_bytes_upstream,
                bytes_held_in_the_partition=proxy.held_bytes_upstream,
                completions_of_step_2=sum(
                    1
                    for _, e in faults.events(run_id)
                    if getattr(e, "seq", None) == 2 and type(e).__name__ == "StepCompleted"
                ),
                result=msgspec.json.decode(msgspec.json.encode(faults.result(run_id))),
            )
            if PARTITION > NOTICE_WITHIN + SLACK:  # long enough: the cut-off worker must have noticed by itself
                assert detected and min(detected) - cut_at <= NOTICE_WITHIN + SLACK, "the cut-off worker never noticed"
        finally:
            faults.close()


async def test_every_call_ends_within_the_deadline_on_both_paths(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One store call (a lease renewal), on the fast lane and on redis-py's path alone: a
    blackholed server fails it within CALL_DEADLINE, retries included; a slow but healthy one
    (2 s each way: 4 s a round trip, under the 7 s socket timeout) answers it; a restart
    (connections refused for 4 s) is ridden out. Real values, every case at once: about 10 s."""
    require_binary("redis-server")
    cases = [(fault, lane) for fault in ("blackhole", "slow", "restart") for lane in (True, False)]
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(RedisProcess(tmp_path / "redis", "--appendonly", "yes"))
        proxies = [stack.enter_context(FaultProxy("127.0.0.1", server.port)) for _ in cases]
        stores: list[RedisStore] = []
        for proxy, (_, lane) in zip(proxies, cases, strict=True):
            if not lane:
                monkeypatch.setenv("WERKFLUSS_FAST_LANE", "0")
            stores.append(await RedisStore.connect(prefix=prefix, url=proxy.url()))
            monkeypatch.delenv("WERKFLUSS_FAST_LANE", raising=False)
            assert (stores[-1]._lane is not None) == lane
            await stores[-1].renew("deadline", 1, 1.0)  # connected, its script loaded: a call like a worker's
        outcomes: dict[tuple[str, bool], tuple[str, float]] = {}

        async def one(store: RedisStore, proxy: FaultProxy, fault: str, lane: bool) -> None:
            if fault == "blackhole":
                proxy.blackhole()
            elif fault == "slow":
                proxy.latency(2.0)
            else:
                proxy.refuse()
                proxy.reset()
            started = time.monotonic()
            try:
                await store.renew("deadline", 1, 1.0)
                outcomes[fault, lane] = "ok", time.monotonic() - started
            except StorageError as exc:
                outcomes[fault, lane] = f"StorageError: {exc}", time.monotonic() - started

        async def back_after(proxy: FaultProxy, seconds: float) -> None:
            await anyio.sleep(seconds)  # the outage's length, not a synchronisation
            proxy.refuse(False)

        try:
            async with anyio.create_task_group() as tg:
                for store, proxy, (fault, lane) in zip(stores, proxies, cases, strict=True):
                    tg.start_soon(one, store, proxy, fault, lane)
                    if fault == "restart":
                        tg.start_soon(back_after, proxy, 4.0)
        finally:
            for proxy in proxies:
                proxy.blackhole(False)
            for store in stores:
                await store.close()
    report(
        "R-12 one call against a blackholed, slow or restarting server [redis]",
        call_deadline_s=CALL_DEADLINE,
        socket_timeout_s=SOCKET_TIMEOUT,
        **{
            f"{fault}_{'lane' if lane else 'redis_py'}": {"outcome": outcome[:80], "s": round(took, 3)}
            for (fault, lane), (outcome, took) in outcomes.items()
        },
    )
    for lane in (True, False):
        outcome, took = outcomes["blackhole", lane]
        assert outcome.startswith("StorageError"), outcome
        assert CALL_DEADLINE - SLACK <= took <= CALL_DEADLINE + SLACK, (lane, took)
        assert outcomes["slow", lane][0] == "ok", outcomes["slow", lane]
        outcome, took = outcomes["restart", lane]
        assert outcome == "ok" and took >= 4.0, outcomes["restart", lane]


def _logged_at(log: str, needle: str) -> float | None:
    """The Unix time of the first line of a worker's log containing `needle` (its asctime, local time)."""
    for line in log.splitlines():
        if needle in line:
            try:
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
    return None


@pytest.mark.parametrize(
    ("path", "lease"),
    [
        # The lease runs out first: Z abandons its write and stops the run when it does.
        ("lease", 3.0),
        # The call's deadline comes first: Z's write fails by itself, then the run is handed back.
        ("deadline", CALL_DEADLINE + 5),
    ],
)
def test_r12_a_blackholed_worker_notices_within_its_bound(tmp_path: Path, prefix: str, path: str, lease: float) -> None:
    """Z's connection is blackholed while it records step 2 and stays so: Z must give the
    write and the run up by itself within min(lease, CALL_DEADLINE) (README), start no step
    after that, and H, on a healthy path, take the run over while Z is still cut off."""
    require_binary("redis-server")
    with (
        RedisProcess(tmp_path / "redis", "--appendonly", "yes") as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        env = {**os.environ, "WERKFLUSS_REDIS_URL": server.url, "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
        env.pop("WERKFLUSS_DIR", None)
        settings = Settings(redis_url=server.url, prefix=prefix, lease=lease)
        faults = Faults(tmp_path / "faults", env, server.url, settings, kind="redis")
        bound = min(lease, CALL_DEADLINE)
        try:
            run_id = "cut-off"
            calls = {run_id: (9,)}
            reference = faults.reference(flows.order, calls)
            zombie, healthy, cut_at = cut_off_after_the_effect(faults, proxy, run_id, calls[run_id])
            target = f"append@{run_id}#c2"

            def given_up() -> list[Write]:
                return [w for w in faults.writes(target) if w.pid == zombie.pid and w.outcome is not None]

            faults.wait(lambda: bool(given_up()), "Z to give its write up", timeout=bound + 30)
            (write,) = given_up()
            noticed = write.done - cut_at if write.done else math.inf
            faults.wait_status([run_id])  # H took the run over, the partition still up
            taken_over = next(e.time for e in faults.resumes(run_id) if f"/{healthy.pid}/" in e.holder)
            log = faults.workers.log(zombie)
            proxy.blackhole(False)

            after_cut = [r for r in faults.ledger("exec") if r.pid == zombie.pid and r.time > cut_at]
            stopped_at = _logged_at(log, f"run {run_id}: lease not renewed")
            interrupted_at = _logged_at(log, f"run {run_id} interrupted")
            cut_off_at = _logged_at(log, "has not reached the store for")
            figures = faults.check(reference.result(DEADLINE))
            report(
                f"R-12 detection of a blackholed worker, {path} first [redis]",
                **figures,
                lease_s=lease,
                call_deadline_s=CALL_DEADLINE,
                bound_s=bound,
                write_outcome=write.outcome,
                write_given_up_after_cut_s=round(noticed, 3),
                write_waited_s=round(write.done - write.called, 3) if write.done else None,
                run_stopped_after_cut_s=round(stopped_at - cut_at, 3) if stopped_at else None,
                run_handed_back_after_cut_s=round(interrupted_at - cut_at, 3) if interrupted_at else None,
                worker_reported_cut_off_after_s=round(cut_off_at - cut_at, 3) if cut_off_at else None,
                takeover_after_cut_s=round(taken_over - cut_at, 3),
                steps_started_by_z_after_cut=len(after_cut),
            )
            assert noticed <= bound + SLACK, f"Z gave its write up {noticed:.1f} s after the cut, bound {bound:g} s"
            if path == "lease":
                assert write.outcome == "cancelled", write
                assert stopped_at is not None and stopped_at - cut_at <= bound + SLACK, log[-2000:]
            else:
                assert write.outcome == "error:StorageError", write
                assert interrupted_at is not None, log[-2000:]
            assert after_cut == [], f"Z started steps after it was cut off: {after_cut}"
            assert noticed < taken_over - cut_at + SLACK, "Z noticed only after H took over"
        finally:
            faults.close()


def test_r12_a_frozen_embedded_server_is_noticed_within_the_bound(tmp_path: Path, prefix: str) -> None:
    """The embedded Valkey's nearest thing to a partition: the server stops answering (SIGSTOP)
    while a worker records step 2. Nothing is reset, nothing answers, as in a blackhole; the
    worker must give the write and the run up within min(lease, CALL_DEADLINE), and finish the
    run itself once the server answers again."""
    directory = Path(tempfile.mkdtemp(prefix="wf-frozen-"))  # short: the socket lives inside
    lease = 3.0
    try:
        server = ensure_server(directory)
        env = {**os.environ, "WERKFLUSS_DIR": str(directory), "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
        env.pop("WERKFLUSS_REDIS_URL", None)
        settings = Settings(directory=str(directory), prefix=prefix, lease=lease)
        faults = Faults(tmp_path / "faults", env, server.url(), settings, kind="valkey")
        frozen = False
        try:
            run_id, step_2 = "frozen", "frozen:2"
            calls = {run_id: (4,)}
            reference = faults.reference(flows.order, calls)
            worker = faults.workers.start()
            faults.arm("after-effect", step_2)
            faults.enqueue(flows.order, [(run_id, calls[run_id])])
            assert faults.wait_reached("after-effect", step_2) == worker.pid
            os.kill(server.pid, signal.SIGSTOP)
            frozen, cut_at = True, time.time()
            faults.release("after-effect", step_2)
            target = f"append@{run_id}#c2"

            def given_up() -> list[Write]:
                return [w for w in faults.writes(target) if w.outcome is not None]

            bound = min(lease, CALL_DEADLINE)
            faults.wait(lambda: bool(given_up()), "the worker to give its write up", timeout=bound + 30)
            (write,) = given_up()
            noticed = write.done - cut_at if write.done else math.inf
            stopped_at = _logged_at(faults.workers.log(worker), f"run {run_id}: lease not renewed")
            os.kill(server.pid, signal.SIGCONT)
            frozen, thawed_at = False, time.time()
            faults.wait_status([run_id])
            figures = faults.check(reference.result(DEADLINE))
            report(
                "R-12 detection of a frozen server [valkey]",
                **figures,
                lease_s=lease,
                bound_s=bound,
                frozen_s=round(thawed_at - cut_at, 3),
                write_outcome=write.outcome,
                write_given_up_after_freeze_s=round(noticed, 3),
                run_stopped_after_freeze_s=round(stopped_at - cut_at, 3) if stopped_at else None,
            )
            assert write.outcome == "cancelled", write
            assert noticed <= bound + SLACK, f"the worker gave its write up {noticed:.1f} s after the freeze"
            assert stopped_at is not None and stopped_at - cut_at <= bound + SLACK
        finally:
            if frozen:
                os.kill(server.pid, signal.SIGCONT)
            faults.close()
    finally:
        stop_server(directory)
        shutil.rmtree(directory, ignore_errors=True)


def test_r07_a_storage_outage_while_a_step_is_recorded_does_not_fail_the_run(tmp_path: Path, prefix: str) -> None:
    """The server becomes unreachable as a step returns, for longer than the retries of that
    write, and is back while the executor still retries its next write."""
    require_binary("redis-server")
    with (
        RedisProcess(tmp_path / "redis", "--appendonly", "yes") as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        env = {**os.environ, "WERKFLUSS_REDIS_URL": proxy.url(), "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
        env.pop("WERKFLUSS_DIR", None)
        # The lease outlasts the write's deadline (CALL_DEADLINE, retries included), so the write gives up
        # before the lease is lost; the run then resumes once its message is claimed again, a lease after
        # the outage began.
        settings = Settings(redis_url=server.url, prefix=prefix, lease=CALL_DEADLINE + 5)
        faults = Faults(tmp_path / "faults", env, server.url, settings, kind="redis")
        try:
            run_id, step_2 = "outage", "outage:2"
            reference = faults.reference(flows.order, {run_id: (5,)})
            faults.workers.start()
            faults.arm("after-effect", step_2)
            faults.enqueue(flows.order, [(run_id, (5,))])
            faults.wait_reached("after-effect", step_2)
            proxy.refuse()  # the server is unreachable: open connections reset, new ones refused
            proxy.reset()
            down_at = time.time()
            faults.release("after-effect", step_2)
            target = f"append@{run_id}#c2"
            faults.wait(lambda: any(w.outcome for w in faults.writes(target)), "the step's write to give up")
            proxy.refuse(False)  # back, while the executor still retries what it does next
            up_at = time.time()
            faults.wait(lambda: faults.status(run_id) in ("completed", "failed"), "the run to end", timeout=120)
            outcome = [w.outcome for w in faults.writes(target)]
            report(
                "R-07 outage while a step is recorded [redis]",
                outage_s=round(up_at - down_at, 3),
                step_write_outcomes=outcome,
                run_status=faults.status(run_id),
                run_error=faults.error(run_id)[:160],
            )
            assert faults.status(run_id) == "completed", faults.error(run_id)
            faults.check(reference.result(DEADLINE))
        finally:
            faults.close()
