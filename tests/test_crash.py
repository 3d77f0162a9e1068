"""Crash tests: a real script is SIGKILLed mid-step or between steps, then rerun.

The steps append to a ledger file, so the test counts real executions.
The lease is set to 60 s: a rerun that waited for the dead holder's lease
to expire would miss the subprocess deadline, so these tests also prove
that a rerun on the same host takes over at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import redis

from .conftest import wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Server

SCRIPT = """
import os, sys
from pathlib import Path
import anyio
from werkfluss import step, workflow, start

LEDGER = Path(os.environ["LEDGER"])

def mark(name: str) -> None:
    with LEDGER.open("a") as f:
        f.write(name + "\\n")

async def hang(point: str) -> None:
    if os.environ.get("HANG_AT") == point:
        Path(os.environ["READY"]).write_text(point)
        await anyio.sleep(120)

@step
async def fetch_data_for_user(user_id: str) -> dict:
    mark("fetch")
    return {"user": user_id, "email": user_id + "@example.com"}

@step
async def save_something_to_db(data: dict) -> None:
    await hang("save-before-effect")
    mark("save")
    await hang("save-after-effect")

@step(retries=3)
async def send_some_email(data: dict) -> None:
    mark("email")

@workflow
async def my_workflow(user_id: str) -> str:
    data = await fetch_data_for_user(user_id)
    await hang("between")
    await save_something_to_db(data)
    await send_some_email(data)
    return "done"

print(start(my_workflow, "user-123"))
"""

Runner = Callable[..., "subprocess.Popen[str]"]


def ledger(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out.strip()


@pytest.mark.parametrize(
    ("hang_at", "expected"),
    [
        ("save-before-effect", {"fetch": 1, "save": 1, "email": 1}),
        ("save-after-effect", {"fetch": 1, "save": 2, "email": 1}),
        ("between", {"fetch": 1, "save": 1, "email": 1}),
    ],
)
def test_sigkill_then_rerun_executes_only_unfinished_steps(
    tmp_path: Path, run_script: Runner, hang_at: str, expected: dict[str, int]
) -> None:
    script = tmp_path / "flow.py"
    script.write_text(SCRIPT)
    book = tmp_path / "ledger.txt"
    ready = tmp_path / "ready"
    env = {"LEDGER": str(book), "READY": str(ready), "WERKFLUSS_LEASE": "60"}

    victim = run_script(script, env={**env, "HANG_AT": hang_at})
    wait_for(lambda: ready.exists() or victim.poll() is not None, what=f"the script to reach {hang_at}")
    assert victim.poll() is None, victim.communicate()
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert ledger(book)["fetch"] == 1

    assert finish(run_script(script, env=env)) == "done"
    assert ledger(book) == expected

    # A third run: the run is completed, nothing executes, "done" at once.
    assert finish(run_script(script, env=env)) == "done"
    assert ledger(book) == expected


PAUSER = """
import logging, sys
from werkfluss import sleep, start, step, workflow

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

@step
async def first() -> str:
    return "first"

@workflow
async def napper() -> str:
    await first()
    await sleep(60)
    return "woke"

print(start(napper.options(run_id=sys.argv[1])))
"""


def test_ctrl_c_right_as_a_run_pauses_stops_the_script_and_leaves_the_run_paused(
    tmp_path: Path, run_script: Runner, server: Server, prefix: str
) -> None:
    # A SIGINT landing as the pause is recorded used to be swallowed by Python 3.11's
    # asyncio.wait_for inside redis-py: the script waited out the whole sleep.
    script = tmp_path / "pauser.py"
    script.write_text(PAUSER)
    for attempt in range(3):
        run_id = f"nap-{attempt}"
        proc = run_script(script, run_id)
        assert proc.stderr is not None
        for line in proc.stderr:
            if "paused, waiting for" in line:
                proc.send_signal(signal.SIGINT)
                break
        try:
            proc.wait(15)  # well before the 60 s timer
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"Ctrl-C at the pause was lost (attempt {attempt + 1}): the script waited on")
        finally:
            proc.communicate()
        assert proc.returncode != 0
        client = redis.Redis.from_url(server.url)
        assert client.hget(f"{prefix}{{{run_id}}}:state", "status") == b"paused"
        client.close()
