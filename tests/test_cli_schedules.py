"""`werkfluss schedules list|show|pause|resume|trigger` through the real console script, in processes that never
imported the module declaring the schedule, and `werkfluss worker MODULE` serving the schedules MODULE declares."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
import pytest

from werkfluss import Schedule, Worker, list_runs_async, list_schedules_async, workflow
from werkfluss import _schedules as schedules_registry

from .helpers import every_server, one_line_error, run_cli, until_status  # noqa: F401 - every_server: `server`
from .workers import Workers, server_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from werkfluss import Settings

    from .conftest import Server
    from .helpers import Cli


@workflow(name="cli-sched.tick")
async def tick(at: datetime) -> str:
    return at.isoformat()


# Declared only in the worker process a test starts (others would serve it on their own prefixes).
if os.environ.get("WF_CLI_SCHEDULE"):
    Schedule(os.environ["WF_CLI_SCHEDULE"], tick, every="1s")


@pytest.fixture
def minutely() -> Iterator[Schedule]:
    declared = Schedule(f"t-cli-{uuid.uuid4().hex[:8]}", tick, "0 9 * * MON-FRI", timezone="Europe/Berlin")
    yield declared
    schedules_registry._SCHEDULES.pop(declared.name, None)


async def test_list_show_pause_resume_trigger(wf: Settings, cli: Cli, minutely: Schedule) -> None:
    name = minutely.name
    async with Worker(settings=wf):
        with anyio.fail_after(10):
            while not await list_schedules_async(settings=wf):
                await anyio.sleep(0.02)
        listed = await cli("schedules", "list")
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split() == ["SCHEDULE", "WORKFLOW", "WHEN", "NEXT", "LAST", "RUN", "STATE"]
        assert row.startswith(name) and "cli-sched.tick" in row and "0 9 * * MON-FRI (Europe/Berlin)" in row
        assert row.rstrip().endswith("served")
        found = json.loads((await cli("schedules", "list", "--json")).stdout)
        assert [(s["name"], s["cron"], s["timezone"], s["paused"]) for s in found] == [
            (name, "0 9 * * MON-FRI", "Europe/Berlin", False)
        ]
        assert datetime.fromisoformat(found[0]["next_tick"]).hour in (7, 8)  # 09:00 in Berlin, in UTC

        paused = await cli("schedules", "pause", name)
        assert paused.returncode == 0 and "paused" in paused.stdout
        shown = await cli("schedules", "show", name)
        assert f"schedule {name}: Schedule('{name}', 'cli-sched.tick', cron='0 9 * * MON-FRI'" in shown.stdout
        assert "state             paused" in shown.stdout and "next tick         -" in shown.stdout
        resumed = await cli("schedules", "resume", name)
        assert resumed.returncode == 0 and "resumed" in resumed.stdout
        assert json.loads((await cli("schedules", "show", name, "--json")).stdout)["paused"] is False

        triggered = await cli("schedules", "trigger", name)
        assert triggered.returncode == 0, triggered.stderr
        run_id = triggered.stdout.split("starts run ")[1].split()[0]
        await until_status(wf, run_id, "completed")
        shown = await cli("schedules", "show", name)
        assert f"last run          {run_id} (completed)" in shown.stdout

    # The worker stopped (and withdrew its declaration): a trigger waits for one, and says so.
    waiting = await cli("schedules", "trigger", name)
    assert waiting.returncode == 0, waiting.stderr
    assert "no worker serves it now; run " in waiting.stdout and "starts when one does" in waiting.stdout
    one_line_error(await cli("schedules", "pause", "nope"), "there is no schedule 'nope'", name)
    one_line_error(await cli("schedules", "show", "nope"), "there is no schedule 'nope'")


async def test_the_worker_command_serves_the_schedules_its_module_declares(
    wf: Settings, server: Server, prefix: str, tmp_path: Path, cli: Cli
) -> None:
    name = f"t-cliw-{uuid.uuid4().hex[:8]}"
    workers = Workers(server_env(server, prefix, WF_CLI_SCHEDULE=name), tmp_path, "tests.test_cli_schedules")
    try:
        workers.start()
        with anyio.fail_after(20):
            while True:
                page = await list_runs_async(workflow="cli-sched.tick", settings=wf)
                if sum(r.run_id.startswith(name + "@") and r.status == "completed" for r in page.runs) >= 2:
                    break
                await anyio.sleep(0.05)
    finally:
        workers.stop_all()
    listed = await cli("schedules", "list")
    assert name in listed.stdout and "every 1s" in listed.stdout
