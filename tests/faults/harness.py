"""The fault-suite harness: worker processes, barriers, the effect ledger, server inspection,
the invariant checker and the figures each scenario reports.

A scenario gets a `Faults` object (fixtures in conftest.py). It starts real worker
processes (`tests.workers.Workers` serving `tests.faults.flows`), arms barriers where a
process must stop, SIGKILLs processes there, and waits for outcomes by polling the
server with deadlines. Afterwards `Faults.check` runs the invariant checker:

- every run under the test's prefix is terminal or parked (statuses the scenario allows);
- each ``(run, seq)`` has at most one ``StepCompleted`` in the run's log;
- every ``StepCompleted`` has an execution row in the ledger, and every completion of an
  effectful step exactly one applied effect;
- no execution or effect row lacks a step invocation in the final history of its run;
- each completed run's result equals the fault-free reference run's.

It asserts the "must be 0" figures and returns them for `report`.

Trial counts: ``WF_FAULT_TRIALS`` (default 10) runs are killed at each barrier point,
``WF_FAULT_BATCH`` (default 5) of them per SIGKILL. RELIABILITY.md asks for >= 100
trials: ``WF_FAULT_TRIALS=100 pytest tests/faults``. ``WF_FAULT_REPORT=<file>`` appends
every figure as a JSON line.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
import redis

from werkfluss import Settings, enqueue_async, invoke_hook_async, start_async
from werkfluss._events import (
    AnyEvent,
    HookReceived,
    RaceWon,
    RunResumed,
    StepCompleted,
    StepFailed,
    TimerStarted,
    decode_event,
)
from werkfluss._store._open import close_stores

from ..conftest import ROOT
from ..workers import Workers, server_env
from .flows import barrier_name

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping
    from pathlib import Path

    from werkfluss import Workflow

    from ..conftest import Server

__all__ = ["BATCH", "DEADLINE", "LEASE", "TRIALS", "Faults", "Row", "Write", "make_faults", "pct", "report"]

TRIALS = int(os.environ.get("WF_FAULT_TRIALS", "10"))
BATCH = max(1, int(os.environ.get("WF_FAULT_BATCH", "5")))
LEASE = 1.0  # seconds: claims and takeovers within a test's patience, yet tolerant of a loaded machine
DEADLINE = 60.0  # seconds any single outcome may take before the scenario fails


def report(name: str, **figures: Any) -> dict[str, Any]:
    """Print the scenario's figures as one line (``pytest -s`` shows it) and append
    them as a JSON line to ``$WF_FAULT_REPORT`` when set."""
    line = json.dumps({"scenario": name, **figures}, default=str)
    print(f"\n[fault] {line}")
    path = os.environ.get("WF_FAULT_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")
    return figures


def pct(values: Iterable[float], q: float) -> float | None:
    """The `q`-th percentile (nearest rank) of `values`, rounded to ms; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)], 3)


# -- the ledger -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One ledger row (see tests/faults/flows.py)."""

    kind: str
    key: str
    pid: int
    time: float
    extra: tuple[str, ...]


def read_ledger(path: Path) -> list[Row]:
    if not path.exists():
        return []
    rows = []
    *lines, _ = path.read_text().split("\n")  # the part after the last newline may be a row being written
    for line in lines:
        kind, key, pid, at, *extra = line.split(" ")
        rows.append(Row(kind, key, int(pid), float(at), tuple(extra)))
    return rows


@dataclass
class Write:
    """One store write a worker attempted: ``call`` and (unless the process died first) ``done`` rows."""

    target: str  # "<method>@<run>[#<dedup>]"
    pid: int
    epoch: str
    called: float
    done: float | None = None
    outcome: str | None = None  # ok, fenced, cancelled, error:<type>, or None: no answer (yet)
    reply: str | None = None


def pair_writes(rows: Iterable[Row]) -> list[Write]:
    writes: list[Write] = []
    open_calls: dict[tuple[int, str], list[Write]] = defaultdict(list)
    for r in rows:
        if r.kind == "call":
            write = Write(r.key, r.pid, r.extra[0], r.time)
            writes.append(write)
            open_calls[(r.pid, r.key)].append(write)
        elif r.kind == "done" and open_calls[(r.pid, r.key)]:
            write = open_calls[(r.pid, r.key)].pop(0)
            write.done, write.outcome = r.time, r.extra[1]
            write.reply = r.extra[2] if len(r.extra) > 2 else None
    return writes


# -- the harness ------------------------------------------------------------------------------------------------------


class Faults:
    """One scenario's world: a server and prefix, a fault directory (ledger, barriers,
    effects, worker logs), worker processes and a direct connection for inspection.

    `env` points a process at the server (``WERKFLUSS_REDIS_URL`` or ``WERKFLUSS_DIR``
    and ``WERKFLUSS_PREFIX``); `url` reaches the same server with redis-py."""

    def __init__(
        self, root: Path, env: dict[str, str], url: str, settings: Settings, *, kind: str, concurrency: int = 16
    ) -> None:
        self.root = root
        self.kind = kind  # which server: "valkey" (embedded) or "redis" (Debian's), for the report
        self.settings = settings
        self.prefix = settings.prefix
        for part in ("barriers/arm", "barriers/taken", "barriers/reached", "barriers/release", "effects", "workers"):
            (root / part).mkdir(parents=True, exist_ok=True)
        self.env = {
            **env, "WF_FAULT_DIR": str(root), "WF_FAULT_INSTRUMENT": "1", "WERKFLUSS_LEASE": str(settings.lease),
            "WERKFLUSS_HOLD": "0.05",  # Settings.hold: a durable sleep longer than this pauses its run
        }  # fmt: skip
        self.workers = Workers(self.env, root / "workers", "tests.faults.flows", concurrency=concurrency)
        self.url = url
        # Any: redis-py's return types are unions over decoding and RESP versions, and differ between
        # the versions pyproject allows; the harness reads raw bytes and knows their shape.
        self.client: Any = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._references: list[concurrent.futures.Future[Any]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="reference")

    def close(self) -> None:
        self.workers.stop_all(graceful=False)  # invariants are checked; barriers may still hold some
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    # -- calling werkfluss from the test process

    def call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Run werkfluss's async API on an event loop of its own, closing its connections after."""

        async def main() -> Any:
            try:
                return await make()
            finally:
                with anyio.CancelScope(shield=True):
                    await close_stores()

        return anyio.run(main, backend="asyncio")

    def enqueue(self, flow: Workflow[..., Any], calls: Iterable[tuple[str, tuple[Any, ...]]]) -> list[str]:
        """Enqueue ``(run_id, args)`` calls of `flow`; returns the run IDs."""

        async def main() -> list[str]:
            return [await enqueue_async(flow.options(settings=self.settings, run_id=r), *args) for r, args in calls]

        return self.call(main)  # type: ignore[no-any-return]

    def invoke_hook(self, token: str, payload: Any) -> None:
        self.call(lambda: invoke_hook_async(token, payload, settings=self.settings))

    def reference(
        self, flow: Workflow[..., Any], calls: Mapping[str, tuple[Any, ...]], hooks: Mapping[str, Any] | None = None
    ) -> concurrent.futures.Future[dict[str, Any]]:
        """Start fault-free reference runs of `flow` for ``{run_id: args}`` in a thread of this
        process, under a prefix of their own, with ``{token: payload}`` delivered first.
        The future maps each run ID to the reference result."""
        settings = msgspec.structs.replace(self.settings, prefix=f"{self.prefix}ref:")

        async def runs() -> dict[str, Any]:
            for token, payload in (hooks or {}).items():
                await invoke_hook_async(token, payload, settings=settings)
            results = {}
            # redis-py's asyncio pool refuses a 101st connection ("Too many connections"): stay well below.
            slots = anyio.Semaphore(16)

            async def one(run_id: str, args: tuple[Any, ...]) -> None:
                async with slots:
                    run = flow.options(settings=settings, run_id=f"ref-{run_id}")
                    results[run_id] = await start_async(run, *args)

            async with anyio.create_task_group() as tg:
                for run_id, args in calls.items():
                    tg.start_soon(one, run_id, args)
            return results

        future = self._pool.submit(self.call, lambda: runs())
        self._references.append(future)
        return future

    # -- barriers

    def _barrier(self, part: str, point: str, key: str) -> Path:
        return self.root / "barriers" / part / barrier_name(point, key)

    def arm(self, point: str, key: str) -> None:
        """The first process reaching ``point`` for ``key`` stops there."""
        self._barrier("arm", point, key).touch()

    def reached(self, point: str, key: str) -> int | None:
        """The PID of the process stopped at ``point@key``, if one is."""
        path = self._barrier("reached", point, key)
        return int(path.read_text()) if path.exists() else None

    def wait_reached(self, point: str, key: str, timeout: float = DEADLINE) -> int:
        self.wait(lambda: self.reached(point, key) is not None, f"a process to reach {point}@{key}", timeout)
        pid = self.reached(point, key)
        assert pid is not None
        return pid

    def release(self, point: str, key: str) -> None:
        self._barrier("release", point, key).touch()

    # -- waiting

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        """Poll `predicate` every 10 ms; fail naming `what` and the workers' state after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # the server is down on purpose in some scenarios: keep polling
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.describe_workers()}")
            time.sleep(0.01)

    def wait_status(
        self, run_ids: Iterable[str], wanted: Iterable[str] = ("completed",), timeout: float = DEADLINE
    ) -> None:
        pending, ok = set(run_ids), set(wanted)

        def done() -> bool:
            for run_id in list(pending):
                if self.status(run_id) in ok:
                    pending.discard(run_id)
            return not pending

        try:
            self.wait(done, f"runs to become {'/'.join(sorted(ok))}", timeout)
        except pytest.fail.Exception as exc:
            left = Counter(self.status(r) or "<missing>" for r in pending)
            errors = [f"{r}: {self.error(r)}" for r in sorted(pending) if self.status(r) in ("failed", "blocked")]
            raise pytest.fail.Exception(
                f"{exc}\nnot there yet: {len(pending)} runs, {dict(left)}: {sorted(pending)[:5]}\n"
                + "\n".join(errors[:5])
            ) from None

    def describe_workers(self) -> str:
        lines = []
        for proc in self.workers.procs:
            state = "alive" if proc.poll() is None else f"exited {proc.returncode}"
            tail = self.workers.log(proc)[-1500:]
            lines.append(f"--- worker {proc.pid} ({state})\n{tail}")
        return "\n".join(lines)

    # -- processes

    def python(self, code: str, *args: str) -> subprocess.Popen[str]:
        """Run ``python -c code args...`` in the workers' environment (stdout and stderr piped)."""
        return subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def victim(self) -> subprocess.Popen[bytes]:
        """The one live worker (started if there is none); scenarios stop runs inside it."""
        alive = self.workers.alive()
        if not alive:
            return self.workers.start()
        assert len(alive) == 1, [p.pid for p in alive]
        self.workers.wait_serving(alive[0])
        return alive[0]

    def kill_pid(self, pid: int) -> subprocess.Popen[bytes]:
        proc = next(p for p in self.workers.procs if p.pid == pid)
        self.workers.kill(proc)
        return proc

    # -- the ledger and the server

    def ledger(self, kind: str | None = None) -> list[Row]:
        rows = read_ledger(self.root / "ledger")
        return rows if kind is None else [r for r in rows if r.kind == kind]

    def writes(self, target: str | None = None) -> list[Write]:
        """The store writes workers attempted, oldest first; only those to `target` if given."""
        found = pair_writes(self.ledger())
        return found if target is None else [w for w in found if w.target == target]

    def key(self, run_id: str, part: str) -> str:
        return f"{self.prefix}{{{run_id}}}:{part}"

    def events(self, run_id: str) -> list[tuple[int, AnyEvent]]:
        """The run's log as ``(index, event)``: entry IDs are ``0-<index>``."""
        found = []
        for entry_id, fields in self.client.xrange(self.key(run_id, "log")):
            found.append((int(entry_id.split(b"-")[1]), decode_event(fields[b"e"])))
        return found

    def state(self, run_id: str) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.client.hgetall(self.key(run_id, "state")).items()}

    def status(self, run_id: str) -> str:
        value = self.client.hget(self.key(run_id, "state"), "status")
        return value.decode() if value else ""

    def result(self, run_id: str) -> Any:
        return msgspec.msgpack.decode(self.state(run_id)["result"])

    def error(self, run_id: str) -> str:
        """A failed or blocked run's recorded error, as ``Type: message``."""
        raw = self.state(run_id).get("error")
        if not raw:
            return ""
        info = msgspec.msgpack.decode(raw)
        return f"{info[0]}: {info[1]}" if isinstance(info, list) and len(info) >= 2 else repr(info)

    def all_runs(self) -> list[str]:
        return [r.decode() for r in self.client.zrange(f"{self.prefix}runs", 0, -1)]

    def dead_letters(self) -> list[dict[str, str]]:
        entries = self.client.xrange(f"{self.prefix}{{q}}:dead")
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]

    def pending_messages(self) -> int:
        """Queue messages delivered to a worker and not yet acknowledged."""
        try:
            return int(self.client.xpending(f"{self.prefix}{{q}}:queue", "workers")["pending"])
        except redis.ResponseError:  # no queue or no group yet
            return 0

    def resumes(self, run_id: str) -> list[RunResumed]:
        return [e for _, e in self.events(run_id) if isinstance(e, RunResumed)]

    # -- the invariant checker

    def check(
        self,
        expected: Mapping[str, Any],
        *,
        statuses: Iterable[str] = ("completed",),
        effectful: Iterable[str] = ("faults:charge",),
        losers: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Check the invariants over every run under the prefix; assert the must-be-0 figures.

        `losers` are step keys (``<run>:<seq>``) of steps that lost a race: cancelled, they
        may have execution rows and no completion.

        `expected` maps each run the scenario started to its reference result (runs that
        are not completed at the end are compared only if they are). Returns the figures."""
        allowed, effect_steps, cancelled = set(statuses), set(effectful), set(losers)
        rows = self.ledger()
        executions = Counter(r.key for r in rows if r.kind == "exec")
        applied = Counter(r.key for r in rows if r.kind == "effect" and r.extra[:1] == ("applied",))
        runs = self.all_runs()
        figures: dict[str, Any] = {
            "runs": len(runs),
            "statuses": dict(Counter(self.status(r) for r in runs)),
            "unknown_runs": sorted(set(runs) ^ set(expected)),
            "duplicate_completions": 0,
            "completions_without_execution": 0,
            "completions_without_effect": 0,
            "rows_without_step": 0,
            "duplicate_effects": sum(1 for n in applied.values() if n > 1),
            "wrong_results": 0,
        }
        problems: list[str] = []
        recorded: dict[str, set[str]] = {}  # run -> keys of its completed steps
        for run_id in runs:
            status = self.status(run_id)
            if status not in allowed:
                problems.append(f"run {run_id} is {status!r}, not {sorted(allowed)}")
            completed: Counter[int] = Counter()
            for _, event in self.events(run_id):
                if isinstance(event, StepCompleted):
                    completed[event.seq] += 1
                    key = f"{run_id}:{event.seq}"
                    if executions[key] == 0:
                        figures["completions_without_execution"] += 1
                        problems.append(f"{key} ({event.step}) completed without an execution row")
                    if event.step in effect_steps and applied[key] != 1:
                        figures["completions_without_effect"] += 1
                        problems.append(f"{key} ({event.step}) completed with {applied[key]} applied effects")
            for seq, count in completed.items():
                if count > 1:
                    figures["duplicate_completions"] += count - 1
                    problems.append(f"{run_id}:{seq} completed {count} times")
            recorded[run_id] = {f"{run_id}:{seq}" for seq in completed}
            if status == "completed" and run_id in expected:
                got = self.result(run_id)
                if got != expected[run_id]:
                    figures["wrong_results"] += 1
                    problems.append(f"run {run_id} returned {got!r}, the reference {expected[run_id]!r}")
        for r in rows:
            if r.kind not in ("exec", "effect"):
                continue
            run_id = r.key.rsplit(":", 1)[0]
            if r.key in cancelled:
                continue
            if run_id not in recorded or (self.status(run_id) == "completed" and r.key not in recorded[run_id]):
                figures["rows_without_step"] += 1
                problems.append(f"ledger row {r} has no step invocation in the final history")
        if figures["duplicate_effects"]:
            problems.append(f"effects applied twice: {[k for k, n in applied.items() if n > 1]}")
        if figures["unknown_runs"]:
            problems.append(f"runs started vs expected differ: {figures['unknown_runs']}")
        assert not problems, "invariants violated:\n" + "\n".join(problems[:40])
        return figures

    def executions_histogram(self, run_ids: Iterable[str]) -> dict[str, dict[int, int]]:
        """``{step ID: {executions: how many invocations}}`` over the runs' completed steps."""
        executions = Counter(r.key for r in self.ledger("exec"))
        histogram: dict[str, Counter[int]] = defaultdict(Counter)
        for run_id in run_ids:
            for _, event in self.events(run_id):
                if isinstance(event, StepCompleted):
                    histogram[event.step][executions[f"{run_id}:{event.seq}"]] += 1
        return {step: dict(sorted(counts.items())) for step, counts in sorted(histogram.items())}

    def acknowledged_lost(self, pids: Iterable[int] | None = None) -> tuple[int, int, list[str]]:
        """Writes a worker saw acknowledged (``done ... ok <index>`` rows of ``append``) that
        are not at that index in the final log: ``(acknowledged, lost, examples)``."""
        wanted = None if pids is None else set(pids)
        acknowledged, lost, examples = 0, 0, []
        logs: dict[str, dict[int, AnyEvent]] = {}
        for r in self.ledger("done"):
            if not r.key.startswith("append@") or r.extra[1:2] != ("ok",) or (wanted and r.pid not in wanted):
                continue
            index = int(r.extra[2])
            if index <= 0:
                continue  # recorded before by someone else: first writer wins
            acknowledged += 1
            run_id, dedup = r.key.removeprefix("append@").rsplit("#", 1)
            if run_id not in logs:
                logs[run_id] = dict(self.events(run_id))
            if not _matches(logs[run_id].get(index), dedup):
                lost += 1
                examples.append(f"{r.key} acknowledged at 0-{index}, log has {logs[run_id].get(index)!r}")
        return acknowledged, lost, examples[:10]


def _matches(event: AnyEvent | None, dedup: str) -> bool:
    """Whether `event` is the one an append with this dedup field wrote."""
    kind, rest = dedup[:1], dedup[1:]
    if kind == "c":
        return isinstance(event, StepCompleted) and event.seq == int(rest)
    if kind == "f":
        seq, attempt = rest.split(":")
        return isinstance(event, StepFailed) and (event.seq, event.attempt) == (int(seq), int(attempt))
    if kind == "t":
        return isinstance(event, TimerStarted) and event.seq == int(rest)
    if kind == "h":
        seq, n = rest.split(":")
        return isinstance(event, HookReceived) and (event.seq, event.n) == (int(seq), int(n))
    if kind == "r":
        return isinstance(event, RaceWon) and event.seq == int(rest)
    return event is not None


def make_faults(server: Server, prefix: str, root: Path, *, lease: float = LEASE, concurrency: int = 16) -> Faults:
    """A `Faults` world like the ``faults`` fixture's, with another lease (for scenarios that
    measure something against the lease, such as a hand-over that must not wait for it)."""
    settings = msgspec.structs.replace(server.settings(prefix), lease=lease)
    return Faults(root, server_env(server, prefix), server.url, settings, kind=server.kind, concurrency=concurrency)
