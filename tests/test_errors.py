"""Errors a newcomer understands (issue 13, part 3), each through the real entry point: the
installed `werkfluss` console script in a subprocess, or the public Python API.

Each test checks a one-line message naming the thing at fault, a non-zero exit code where
it is a command, and that nothing was created or lost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import pytest

from werkfluss import (
    ConfigurationError,
    RunNotFoundError,
    Worker,
    cancel,
    cancel_async,
    enqueue,
    enqueue_async,
    get_run_async,
    list_runs_async,
    start,
    start_async,
    step,
    workflow,
)
from werkfluss._store._embedded import ensure_server, server_status, stop_server
from werkfluss._store._open import open_store

from . import worker_flows
from .conftest import ROOT, wait_for
from .helpers import WERKFLUSS, one_line_error, run_cli
from .servers import RedisProcess
from .workers import Workers, server_env

if TYPE_CHECKING:
    from collections.abc import Callable

    from werkfluss import Settings

    from .conftest import Server
    from .helpers import Cli

pytestmark = pytest.mark.slow


@pytest.fixture
def cli(server: Server, prefix: str) -> Cli:
    """The `werkfluss` console script against the test's server and prefix."""

    async def run(*args: str) -> Any:
        return await run_cli(*args, env=server_env(server, prefix))

    return run


def bare_env(**extra: str) -> dict[str, str]:
    """The environment without any werkfluss configuration: what a newcomer's shell has."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("WERKFLUSS_")}, **extra}


async def no_runs(settings: Settings) -> None:
    assert (await list_runs_async(settings=settings)).runs == []


# -- start()/enqueue() of a step ---------------------------------------------------------------------------------------


@step(name="errors.charge")
async def charge(amount: int) -> int:
    return amount


async def plain(amount: int) -> int:
    return amount


@pytest.mark.parametrize("called", ["start", "start_async", "enqueue", "enqueue_async"])
async def test_starting_a_step_says_to_wrap_it_in_a_workflow(
    wf: Settings, called: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default embedded server would appear here
    entry: Callable[..., Any] = {"start": start, "start_async": start_async, "enqueue": enqueue,
                                 "enqueue_async": enqueue_async}[called]  # fmt: skip
    for wrong in (charge, plain):
        with pytest.raises(ConfigurationError) as caught:
            outcome = entry(wrong, 5)
            if called.endswith("_async"):
                await outcome
        message = str(caught.value)
        assert "\n" not in message and "AttributeError" not in message
        assert message.startswith(f"{called}() takes a workflow")
        if wrong is charge:
            assert "'errors.charge' is a step" in message
            assert "@workflow async def charge_flow(...): return await charge(...)" in message
        else:
            assert "plain (function)" in message and "decorate the async function with @workflow" in message
    assert not (tmp_path / ".werkfluss").exists()
    await no_runs(wf)


# -- werkfluss worker against an unreachable server --------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


async def test_a_worker_that_cannot_reach_its_server_says_so_in_one_line() -> None:
    port = closed_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    raw = await anyio.run_process(
        [WERKFLUSS, "worker", "tests.worker_flows", "--redis-url", url], cwd=ROOT,
        env=bare_env(PYTHONPATH=str(ROOT)), check=False,
    )  # fmt: skip
    done = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    one_line_error(done, f"werkfluss: cannot reach redis://:***@127.0.0.1:{port}/0")
    assert "hunter2" not in done.stderr and "ExceptionGroup" not in done.stderr


# -- read commands where there is no data ------------------------------------------------------------------------------

QUESTIONS = [("runs", "list"), ("runs", "show", "order-7"), ("runs", "show", "order-7", "--json"), ("hooks", "list"),
             ("dead", "list"), ("runs", "cancel", "order-7"), ("runs", "resume", "order-7"),
             ("dead", "redrive", "--all")]  # fmt: skip


async def test_commands_about_runs_create_no_server_where_there_is_no_data(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    outcomes: dict[tuple[str, ...], Any] = {}

    async def ask(args: tuple[str, ...], env: dict[str, str], where: Path) -> None:
        done = await anyio.run_process([WERKFLUSS, *args], cwd=tmp_path, env=env, check=False)
        done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()  # type: ignore[assignment]
        outcomes[(*args, str(where))] = (done, where)

    async with anyio.create_task_group() as tg:
        for args in QUESTIONS:
            tg.start_soon(ask, args, bare_env(), tmp_path / ".werkfluss")  # the default: ./.werkfluss
        tg.start_soon(ask, ("runs", "list"), bare_env(WERKFLUSS_DIR=str(elsewhere)), elsewhere)
        tg.start_soon(ask, ("runs", "list", "--dir", str(elsewhere)), bare_env(), elsewhere)
    for done, where in outcomes.values():
        one_line_error(done, f"no werkfluss data in {where}:", "none was started", "--dir DIR (WERKFLUSS_DIR)",
                       "--redis-url URL (WERKFLUSS_REDIS_URL)")  # fmt: skip
    assert await anyio.Path(tmp_path).exists() and not [p async for p in anyio.Path(tmp_path).iterdir()]
    assert server_status(tmp_path / ".werkfluss") is None


async def test_a_stopped_embedded_server_is_started_again_on_its_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ensure_server(data)
    stop_server(data)
    try:
        done = await run_cli("runs", "list", "--dir", str(data), env=bare_env())
        assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "no runs", "")
        assert server_status(data) is not None
    finally:
        stop_server(data)


def looked_in(server: Server) -> str:
    """Where the CLI says it looked on `server`: its URL, or the embedded server's data directory."""
    return server.env.get("WERKFLUSS_REDIS_URL") or str(Path(server.env["WERKFLUSS_DIR"]).resolve())


async def test_an_unknown_run_names_where_it_was_looked_for(server: Server, cli: Cli, prefix: str) -> None:
    expected = f"there is no run 'order-7' in {looked_in(server)} (key prefix {prefix!r})"
    for action in ("show", "cancel", "resume"):
        one_line_error(await cli("runs", action, "order-7"), expected, "--dir", "--redis-url")


# -- dead redrive --all with nothing to re-drive -----------------------------------------------------------------------


async def test_redrive_all_with_no_dead_letters_says_there_are_none(wf: Settings, cli: Cli) -> None:
    done = await cli("dead", "redrive", "--all")
    assert (done.returncode, done.stdout, done.stderr) == (0, "no dead letters to re-drive\n", "")
    assert json.loads((await cli("dead", "list", "--json")).stdout) == []
    await no_runs(wf)


# -- werkfluss runs list | head ----------------------------------------------------------------------------------------


def head_one(command: list[str], env: dict[str, str]) -> tuple[bytes, int, str]:
    """Like ``command | head -1``: read one line, close the pipe; (that line, exit code, stderr)."""
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        return first, proc.wait(30), stderr


@workflow(name="errors.numbered")
async def numbered(n: int) -> int:
    return n


async def test_runs_list_into_a_pipe_closed_early_exits_0_quietly(wf: Settings, server: Server, prefix: str) -> None:
    count = 1200  # rows of about 80 characters: more than a pipe's 64 KiB buffer
    for n in range(count):
        await enqueue_async(numbered.options(run_id=f"many-{n:04}", settings=wf), n)
    first, code, stderr = await anyio.to_thread.run_sync(
        head_one, [WERKFLUSS, "runs", "list", "--limit", str(count)], server_env(server, prefix)
    )
    assert (code, stderr) == (0, "")
    assert first.split()[:2] == [b"RUN", b"ID"]
    assert len((await list_runs_async(limit=count, settings=wf)).runs) == count  # nothing changed


# -- lossy servers: warnings that reach a user who configured no logging -----------------------------------------------

SCRIPT = textwrap.dedent("""
    import logging, sys
    from werkfluss import start, workflow

    if sys.argv[1] == "logging":
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")

    @workflow(name="errors.one")
    async def one() -> int:
        return 1

    print(start(one), start(one))  # two connections: each warning once on stderr
""")


def test_a_lossy_server_is_reported_on_stderr_without_logging_and_once_with_it(tmp_path: Path) -> None:
    script = tmp_path / "lossy.py"
    script.write_text(SCRIPT)
    with RedisProcess(tmp_path / "redis", "--maxmemory-policy", "allkeys-lru", tcp=False, unix_socket=True) as lossy:
        env = bare_env(WERKFLUSS_REDIS_URL=lossy.unix_url, PYTHONPATH=str(ROOT))
        cli = subprocess.run([WERKFLUSS, "runs", "list"], env=env, capture_output=True, text=True, cwd=tmp_path,
                             timeout=60, check=False)  # fmt: skip
        plain = subprocess.run([sys.executable, str(script), "plain"], env=env, capture_output=True, text=True,
                               cwd=tmp_path, timeout=60, check=False)  # fmt: skip
        logged = subprocess.run([sys.executable, str(script), "logging"], env=env, capture_output=True, text=True,
                                cwd=tmp_path, timeout=60, check=False)  # fmt: skip
    assert (cli.returncode, cli.stdout) == (0, "no runs\n"), cli.stderr
    assert (plain.returncode, plain.stdout, logged.returncode, logged.stdout) == (0, "1 1\n", 0, "1 1\n")
    for done in (cli, plain):
        warned = [line for line in done.stderr.splitlines() if "LossyServerWarning: " in line]
        assert len(warned) == 2, done.stderr
        assert f"{lossy.unix_url} has maxmemory-policy allkeys-lru" in warned[0] and "use noeviction" in warned[0]
        assert f"{lossy.unix_url} has no persistence" in warned[1] and "use appendonly yes" in warned[1]
    # With logging configured the logger reports it, and only the logger.
    assert "LossyServerWarning" not in logged.stderr
    assert {line.split(": ", 1)[0] for line in logged.stderr.splitlines()} == {"WARNING werkfluss"}
    assert "allkeys-lru" in logged.stderr and "no persistence" in logged.stderr
    assert not (tmp_path / ".werkfluss").exists()


async def test_the_test_servers_are_not_reported_lossy(wf: Settings, cli: Cli) -> None:
    done = await cli("runs", "list")
    assert (done.returncode, done.stdout, done.stderr) == (0, "no runs\n", "")


# -- a worker stopped by a second Ctrl-C -------------------------------------------------------------------------------


def ledger_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_second_ctrl_c_stops_a_worker_at_once_and_its_runs_wait_for_a_worker(
    wf: Settings, server: Server, prefix: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    workers = Workers(server_env(server, prefix, WF_STEP_DELAY="60", WF_LEDGER=str(ledger)), tmp_path)
    proc = workers.start("--grace", "60")
    try:
        run_id = await enqueue_async(worker_flows.five.options(run_id="ctrl-c-7", settings=wf), 7)
        wait_for(lambda: len(ledger_lines(ledger)) == 1, what="the worker to begin the first step")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "Press Ctrl-C again" in workers.log(proc), what="the first Ctrl-C's message")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 128 + signal.SIGINT, workers.log(proc)  # at once: not after the 60 s grace
    finally:
        workers.stop_all(graceful=False)
    log = workers.log(proc)
    assert "stopping at once; unfinished runs go back to the queue" in log and "Traceback" not in log

    run = await get_run_async(run_id, settings=wf)
    store = await open_store(wf)
    assert run.status == "pending" and (await store.state(run_id)).holder == ""
    # Nothing lost: a worker takes it from the queue and resumes it; the cut step executes again.
    async with Worker(settings=wf):
        with anyio.fail_after(30):
            while (await get_run_async(run_id, settings=wf)).status != "completed":
                await anyio.sleep(0.02)
    assert (await get_run_async(run_id, settings=wf)).result == worker_flows.expected_five(7)
    assert await store.dead_letters(10) == []


async def test_runs_handed_back_by_a_graceful_stop_are_pending_and_resume_on_start(
    wf: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, go_on = anyio.Event(), anyio.Event()

    @step(name="errors.slow")
    async def slow(x: int) -> int:
        started.set()
        await go_on.wait()
        return x

    @workflow(name="errors.two_slow")
    async def two_slow(x: int) -> int:
        return await slow(x) + await slow(x + 1)

    run_id = await enqueue_async(two_slow.options(run_id="handed-back", settings=wf), 1)
    async with Worker(settings=wf, grace=10) as worker:
        with anyio.fail_after(20):
            await started.wait()
        worker.stop()
        go_on.set()  # the first step finishes; the run stops at the boundary and is handed back
    run = await get_run_async(run_id, settings=wf)
    store = await open_store(wf)
    assert run.status == "pending" and (await store.state(run_id)).holder == ""
    assert run.last_seq == 1
    # Attaching resumes it (runs resume and start() keep their meaning for a pending run).
    assert await start_async(two_slow.options(run_id=run_id, settings=wf), 1) == 3


# -- cancel of an unknown run ------------------------------------------------------------------------------------------


async def test_cancel_of_an_unknown_run_raises_run_not_found(wf: Settings) -> None:
    with pytest.raises(RunNotFoundError, match=r"^there is no run 'order-7'$"):
        await cancel_async("order-7", "never mind", settings=wf)
    await no_runs(wf)


def test_blocking_cancel_of_an_unknown_run_raises_run_not_found(settings: Settings) -> None:
    with pytest.raises(RunNotFoundError) as caught:
        cancel("order-8", settings=settings)
    assert caught.value.run_id == "order-8"
