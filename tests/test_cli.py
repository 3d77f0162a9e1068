"""Every `werkfluss` command through the real console script, in a subprocess, against a
real server: the output people read, the JSON scripts read, and the one-line errors."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import pytest

from werkfluss import (
    RunCancelledError,
    get_events_async,
    get_run_async,
    hook,
    invoke_hook_async,
    start_async,
    step,
    workflow,
)
from werkfluss._store._open import open_store
from werkfluss.events import RunPaused, RunResumed, RunStarted, StepCompleted, StepFailed

from .helpers import one_line_error, run_cli
from .shop_flows import SECRET, attempts, run_checkout

if TYPE_CHECKING:
    from werkfluss import Settings

    from .helpers import Cli

ROW = re.compile(r"^ {0,3}(\d+) (.{22}) (\S+)\s+(\d*)\s+(\S*) \|(.{28})\|$")
ANSI = re.compile(r"\033\[[0-9;]*m")
gates: dict[str, anyio.Event] = {}
RESET = (attempts, gates)  # What conftest's `wf` clears before each test.


@workflow(name="cli.waits")
async def waits(x: int) -> int:
    return await hook(f"cli-wait:{x}", type=int) + x


@step(name="cli.stubborn")
async def stubborn(n: int) -> int:
    gates["entered"].set()
    # Shielded: the cancel cannot stop it mid-step, so the run is still running when the CLI reads it.
    with anyio.CancelScope(shield=True):
        await gates["open"].wait()
    return n


@workflow(name="cli.busy")
async def busy(n: int) -> int:
    return await stubborn(n) + await stubborn(n + 1)  # the second call is the boundary the cancel stops at


async def until(settings: Settings, run_id: str, status: str) -> None:
    store = await open_store(settings)
    with anyio.fail_after(20):
        while await store.status(run_id) != status:
            await anyio.sleep(0.01)


# -- runs show: the timeline -----------------------------------------------------------------------------------------


def expected_rows(events: list[Any]) -> dict[int, tuple[str, str, str]]:
    """What the log says each step row must show: (name, outcome, tries)."""
    last_session = max(e.time for e in events if isinstance(e, (RunStarted, RunResumed)))
    rows: dict[int, tuple[str, str, str]] = {}
    for e in events:
        if isinstance(e, StepCompleted):
            rows[e.seq] = (e.step, "executed" if e.time >= last_session else "replayed", str(e.attempt))
        elif isinstance(e, StepFailed):
            rows[e.seq] = (e.step, "failed" if e.final else "retrying", str(e.attempt))
    return rows


async def test_runs_show_draws_retries_a_hook_pause_and_the_failure(wf: Settings, cli: Cli) -> None:
    await run_checkout(wf, "bad-7")
    events = await get_events_async("bad-7", settings=wf)
    done = await cli("runs", "show", "bad-7")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert not ANSI.search(done.stdout)  # piped: plain
    assert lines[0] == "run bad-7 · shop.checkout · failed"

    rows = {int(m[1]): (m[2].strip(), m[3], m[4], m[6]) for m in map(ROW.match, lines) if m}
    expected = expected_rows(events)
    assert {seq: row[:3] for seq, row in rows.items() if seq in expected} == expected
    assert expected == {1: ("shop.reserve", "replayed", "1"), 2: ("shop.charge", "replayed", "3"),
                        4: ("shop.ship", "failed", "1")}  # fmt: skip
    # The hook's row, at its seq, after the pause.
    assert rows[3][:2] == ("hook:approve:bad-7", "received")
    # Bars on one time axis: each step starts no earlier than the one before; the retries show as failed attempts.
    starts = [rows[seq][3].index(next(c for c in rows[seq][3] if c != " ")) for seq in (1, 2, 3, 4)]
    assert starts == sorted(starts)
    assert "x" in rows[2][3] and "#" in rows[2][3] and "x" in rows[4][3]

    text = done.stdout
    pause = [e for e in events if isinstance(e, RunPaused)]
    assert len(pause) == 1 and "waiting for hook 'approve:bad-7'" in text
    assert re.search(r"^\s+paused\s+\S+ \|\s*\.+\s*\|$", text, re.M)  # the gap on the axis
    assert text.count("-- started") == 1
    assert text.count("-- resumed after a pause (2 steps in the log)") == 1
    assert text.count("attempt 1: ConnectionError: payment gateway timed out") == 1
    assert text.count("attempt 2: ConnectionError: payment gateway timed out") == 1
    assert "attempt 1: ValueError: no courier for 3 parcels" in text
    assert "Traceback (most recent call last):" in text and 'raise ValueError(f"no courier' in text
    assert re.search(r"^\s+run failed\s+failed", text, re.M) and "because step #4 failed" in text

    coloured = await cli("runs", "show", "bad-7", "--color", "always")
    assert ANSI.search(coloured.stdout)
    plain_rows = [ANSI.sub("", line) for line in coloured.stdout.splitlines()]
    assert all(len(line) <= 80 for line in plain_rows)
    assert len(plain_rows) == len(lines)


async def test_runs_show_json_has_the_run_and_every_event(wf: Settings, cli: Cli) -> None:
    await run_checkout(wf, "ok-7")
    done = await cli("runs", "show", "ok-7", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["run"]["status"] == "completed" and data["run"]["args"] == ["ok-7"]
    events = await get_events_async("ok-7", settings=wf)
    assert [e["kind"] for e in data["events"]] == [type(e).__struct_config__.tag for e in events]
    hooks = [e for e in data["events"] if e["kind"] == "hook-received"]
    assert hooks[0]["payload"] is True and hooks[0]["token"] == "approve:ok-7"
    assert data["run"]["result"] == "ok-7 shipped receipt-ok-7-" + SECRET
    completions = [e for e in data["events"] if e["kind"] == "step-completed"]
    assert [(e["seq"], e["step"]) for e in completions] == [(1, "shop.reserve"), (2, "shop.charge"), (4, "shop.ship")]
    assert completions[0]["args"] == [["ok-7"], {}] and completions[0]["result"] == 3


# -- runs list, cancel, resume ---------------------------------------------------------------------------------------


async def test_runs_list_shows_a_table_and_json_with_filters(wf: Settings, cli: Cli) -> None:
    await run_checkout(wf, "ok-8")
    await run_checkout(wf, "bad-8")
    table = await cli("runs", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["RUN", "ID", "STATUS", "WORKFLOW", "CREATED", "(UTC)", "UPDATED", "(UTC)"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["bad-8", "failed", "shop.checkout"], ["ok-8", "completed", "shop.checkout"],
    ]  # fmt: skip
    failed = json.loads((await cli("runs", "list", "--status", "failed", "--json")).stdout)
    assert [r["run_id"] for r in failed["runs"]] == ["bad-8"] and failed["cursor"] is None
    paged = json.loads((await cli("runs", "list", "--limit", "1", "--json")).stdout)
    assert [r["run_id"] for r in paged["runs"]] == ["bad-8"] and paged["cursor"]
    rest = await cli("runs", "list", "--limit", "1", "--cursor", paged["cursor"], "--workflow", "shop.checkout")
    assert rest.stdout.splitlines()[1].split()[0] == "ok-8"
    none = await cli("runs", "list", "--workflow", "nothing.here")
    assert none.stdout.strip() == "no runs"


async def test_runs_cancel_and_resume(wf: Settings, cli: Cli) -> None:
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            with pytest.raises(Exception, match="cancelled from the command line"):
                await start_async(waits.options(run_id="cli-w", settings=wf), 1)

        tg.start_soon(wait)
        await until(wf, "cli-w", "paused")
        done = await cli("runs", "cancel", "cli-w")
        assert (done.returncode, done.stdout.strip()) == (0, "run cli-w: cancelled")
    assert (await get_run_async("cli-w", settings=wf)).status == "cancelled"
    again = await cli("runs", "cancel", "cli-w")
    assert (again.returncode, again.stdout.strip()) == (0, "run cli-w: already cancelled, nothing to cancel")
    refused = await cli("runs", "resume", "cli-w")
    one_line_error(refused, "'cli-w' is cancelled: there is nothing to resume")

    await run_checkout(wf, "bad-9")
    resumed = await cli("runs", "resume", "bad-9")
    assert resumed.returncode == 0 and resumed.stdout.strip() == (
        "run bad-9 (failed) is back on the queue: a worker will resume it"
    )
    store = await open_store(wf)
    assert cast("list[Any]", await store.client.xrange(store.queue_key("queue")))[-1][1][b"r"] == b"bad-9"


async def test_runs_cancel_of_a_run_a_live_process_holds_says_it_is_only_requested(wf: Settings, cli: Cli) -> None:
    gates["entered"], gates["open"] = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:

        async def execute() -> None:
            with pytest.raises(RunCancelledError):
                await start_async(busy.options(run_id="cli-busy", settings=wf), 1)

        tg.start_soon(execute)
        try:
            with anyio.fail_after(20):
                await gates["entered"].wait()
            done = await cli("runs", "cancel", "cli-busy", "--reason", "stop it")
            assert (done.returncode, done.stdout.strip()) == (
                0,
                "run cli-busy: cancel requested; it stops at its next step (status: running)",
            ), done.stderr
            assert (await get_run_async("cli-busy", settings=wf)).status == "running"
        finally:  # a failed assertion must not leave the step waiting forever
            gates["open"].set()
    run = await get_run_async("cli-busy", settings=wf)
    assert (run.status, run.cancel_reason, run.last_seq) == ("cancelled", "stop it", 1)


# -- hooks -----------------------------------------------------------------------------------------------------------


async def test_hooks_send_wakes_a_paused_run_and_list_shows_unclaimed_payloads(wf: Settings, cli: Cli) -> None:
    result: list[int] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await start_async(waits.options(run_id="cli-h", settings=wf), 2))

        tg.start_soon(run)
        await until(wf, "cli-h", "paused")
        sent = await cli("hooks", "send", "cli-wait:2", "40")
        assert (sent.returncode, sent.stdout.strip()) == (0, "delivered to hook 'cli-wait:2'")
    assert result == [42]

    assert (await cli("hooks", "list")).stdout.strip() == "no payloads waiting"
    piped = await cli("hooks", "send", "early-bird", "-", stdin='{"ok": true}')
    assert piped.returncode == 0, piped.stderr
    await invoke_hook_async("early-bird", [1, 2], settings=wf)
    table = await cli("hooks", "list")
    assert table.stdout.splitlines()[0].split() == ["TOKEN", "PAYLOADS", "LAST", "DELIVERY", "CLAIMED", "BY"]
    assert table.stdout.splitlines()[1].split()[:2] == ["early-bird", "2"]
    listed = json.loads((await cli("hooks", "list", "--json")).stdout)
    assert [(h["token"], h["payloads"], h["owner"]) for h in listed] == [("early-bird", 2, None)]


# -- dead letters and the server -------------------------------------------------------------------------------------


async def test_dead_list_and_redrive(wf: Settings, cli: Cli) -> None:
    assert (await cli("dead", "list")).stdout.strip() == "no dead letters"
    assert json.loads((await cli("dead", "list", "--json")).stdout) == []
    store = await open_store(wf)
    await store.client.xadd(store.queue_key("queue"), {"r": "some-run"})
    await store.ensure_group("workers")
    await store.client.xgroup_setid(store.queue_key("queue"), "workers", "0")
    for message, _fields in await store.read_queue("workers", "cli-test", 10, 0.1):
        await store.dead_letter("workers", message, "some-run", "poison (test)")
    letters = json.loads((await cli("dead", "list", "--json")).stdout)
    assert [(d["run_id"], d["reason"], d["queue"], d["source"]) for d in letters] == [
        ("some-run", "poison (test)", "default", None)
    ]
    assert isinstance(letters[0]["deliveries"], int) and letters[0]["deliveries"] >= 1
    assert datetime.fromisoformat(letters[0]["at"]).utcoffset() == timedelta(0)
    assert abs(datetime.fromisoformat(letters[0]["at"]).timestamp() - time.time()) < 60
    assert not {"r", "at_ms"} & letters[0].keys() and letters[0]["fields"]["r"] == "some-run"  # raw: under "fields"
    table = (await cli("dead", "list")).stdout.splitlines()
    assert table[0].split() == ["ID", "RUN", "REASON"] and table[1].split()[1:] == ["some-run", "poison", "(test)"]
    redrive = await cli("dead", "redrive", letters[0]["id"])
    assert (redrive.returncode, redrive.stdout.strip()) == (
        0,
        f"{letters[0]['id']}: re-driven (run some-run back on queue default)",
    ), redrive.stderr
    assert cast("list[Any]", await store.client.xrange(store.queue_key("queue")))[-1][1][b"r"] == b"some-run"
    missing = await cli("dead", "redrive", "1-1")
    assert missing.returncode == 1 and "no such dead letter" in missing.stdout
    one_line_error(await cli("dead", "redrive"), "name the dead letters to re-drive, or pass --all")


async def test_server_status_json(tmp_path: Path, cli: Cli) -> None:
    done = await cli("server", "status", "--dir", str(tmp_path / "none"), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"running": False, "directory": str(tmp_path / "none")}


# -- errors: one line, exit code 1, no traceback ---------------------------------------------------------------------


async def test_a_bad_log_level_is_a_usage_error_without_a_traceback(cli: Cli) -> None:
    done = await cli("worker", "os", "--log-level", "bogus")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "argument --log-level: invalid choice: 'BOGUS'" in done.stderr
    one_line_error(await cli("worker", "os", "--log-level", "debug"), "os defines no workflows")


async def test_unknown_run_ids_are_one_line_errors(wf: Settings, cli: Cli) -> None:
    for action in ("show", "cancel", "resume"):
        one_line_error(await cli("runs", action, "ghost"), "there is no run 'ghost'")
    one_line_error(await cli("runs", "show", "bad id"), "invalid run_id 'bad id'")


async def test_bad_hook_json_is_a_one_line_error(wf: Settings, cli: Cli) -> None:
    done = await cli("hooks", "send", "some-token", "{not json")
    one_line_error(done, "the payload for hook 'some-token' is not valid JSON")
    one_line_error(await cli("hooks", "send", "some-token"), "usage: werkfluss hooks send TOKEN JSON")
    assert (await cli("hooks", "list")).stdout.strip() == "no payloads waiting"  # nothing was delivered


async def test_unreachable_redis_is_a_one_line_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WERKFLUSS_")}
    commands = [("runs", "list"), ("runs", "show", "x"), ("runs", "cancel", "x"), ("hooks", "list"),
                ("hooks", "send", "t", "1"), ("dead", "list")]  # fmt: skip
    outcomes: dict[tuple[str, ...], Any] = {}

    async def attempt(args: tuple[str, ...]) -> None:
        outcomes[args] = await run_cli(*args, "--redis-url", url, env=env)

    async with anyio.create_task_group() as tg:  # each waits out the client's retries: all at once
        for args in commands:
            tg.start_soon(attempt, args)
    for done in outcomes.values():
        one_line_error(done, f"127.0.0.1:{port}")
        assert "hunter2" not in done.stderr


def test_a_run_cancelled_while_paused_ends_its_pause_at_the_cancel() -> None:
    """The pause's bar ends where the run did, not at the moment of looking (it grew each time)."""
    import msgspec

    from werkfluss._cli._timeline import rows
    from werkfluss._events import RunCancelled, Waiting

    events: list[Any] = [
        RunStarted(1000.0, "w", msgspec.Raw(b"\x90")),
        RunPaused(1001.0, [Waiting("hook", token="t")]),
        RunCancelled(1006.0, "deadline 6s passed at 2026-12-02T00:00:06Z"),
    ]
    for now in (1100.0, 1200.0):
        [pause] = [row for row in rows(events, now=now) if row.kind == "pause"]
        assert (pause.start, pause.end, pause.spans) == (1001.0, 1006.0, [(1001.0, 1006.0, "paused")])
