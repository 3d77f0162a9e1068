"""`werkfluss queues list|show`, the queue and the wait in `runs show`, `dead list|redrive` across
queues and `werkfluss worker --queue`, through the real console script, in processes that never
imported the module declaring the queues (but the worker, which imports this one)."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

import anyio
import msgspec

from werkfluss import Queue, Worker, enqueue_async, queue_info_async, step, workflow
from werkfluss._store._open import open_store

from .helpers import (
    every_server,  # noqa: F401 - the `server` fixture: each test runs on the cluster too
    one_line_error,
    statuses,
    until_all,
    until_status,
)
from .workers import Workers, server_env

if TYPE_CHECKING:
    from pathlib import Path

    from werkfluss import Settings

    from .conftest import Server
    from .helpers import Cli

# The queue `werkfluss worker tests.test_cli_queues --queue t-cliq-served` serves (this module declares it).
served = Queue("t-cliq-served")
started: Counter[str] = Counter()
gates: dict[str, anyio.Event] = {}
RESET = (started, gates)


@step
async def hold(n: int) -> int:
    started["all"] += 1
    await gates["open"].wait()
    return n


@workflow(name="cliq.held")
async def held(n: int) -> int:
    return await hold(n)


@workflow(name="cliq.echo")
async def echo(n: int) -> int:
    return n


def entry_fields(fields: dict[bytes, bytes] | list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields: a dict, or as the reply came (a flat list) from the store's client on a cluster."""
    return fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2], strict=True))


def unique(what: str) -> str:
    return f"t-cliq-{what}-{uuid.uuid4().hex[:8]}"


async def until_started(n: int, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while started["all"] < n:
            await anyio.sleep(0.02)


# -- queues list / show ----------------------------------------------------------------------------------------------


async def test_queues_list_and_show_a_full_queue_from_what_the_store_holds(wf: Settings, cli: Cli) -> None:
    invoices = Queue(unique("inv"), concurrency=2, rate="100/min")
    gates["open"] = anyio.Event()
    keys = ["acme", "acme", "acme", "beta", "beta"]
    ids = [await enqueue_async(held.options(settings=wf, queue=invoices, key=k), n) for n, k in enumerate(keys)]
    async with Worker(settings=wf, concurrency=10, queues=[invoices]):
        await until_started(2)
        listing = await cli("queues", "list")
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert lines[0].split() == [
            "QUEUE",
            "PARTITIONS",
            "LIMITS",
            "WAITING",
            "RUNNING",
            "DELAYED",
            "OLDEST",
            "WAITING",
        ]
        assert lines[1].split() == ["default", "1", "-", "0", "0", "0", "-"]
        row = lines[2].split()
        assert row[:7] == [invoices.name, "1", "concurrency=2", "rate=100/min", "3", "2", "0"]
        assert re.fullmatch(r"\d+ms|\d+\.\ds", row[7]), row
        assert len(lines) == 3

        listed = {q["name"]: q for q in json.loads((await cli("queues", "list", "--json")).stdout)}
        mine = listed[invoices.name]
        assert (mine["waiting"], mine["running"], mine["concurrency"], mine["rate"], mine["limited"]) == (
            3,
            2,
            2,
            "100/min",
            True,
        )
        assert mine["declared"] == f"Queue({invoices.name!r}, concurrency=2, rate='100/min')"

        shown = await cli("queues", "show", invoices.name)
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout.splitlines()
        assert text[0] == f"queue {invoices.name}: Queue({invoices.name!r}, concurrency=2, rate='100/min')"
        facts = {line[:14].strip(): line[16:] for line in text[1:8]}
        assert facts["limits"] == "concurrency=2 rate=100/min"
        assert (facts["waiting"], facts["running"], facts["delayed"]) == ("3", "2", "0")
        assert facts["ready"].startswith("0 ")
        busiest = text[text.index("busiest keys:") + 1 :]
        assert [line.split() for line in busiest] == [
            ["KEY", "RUNNING", "WAITING"],
            ["acme", "1", "2"],
            ["beta", "1", "1"],
        ]

        as_json = json.loads((await cli("queues", "show", invoices.name, "--json")).stdout)
        here = msgspec.to_builtins(await queue_info_async(invoices.name, settings=wf))
        assert {k: v for k, v in as_json.items() if k != "oldest_waiting"} == {
            k: v for k, v in here.items() if k != "oldest_waiting"
        }
        top = json.loads((await cli("queues", "show", invoices.name, "--top", "1", "--json")).stdout)
        assert top["busiest_keys"] == [{"key": "acme", "running": 1, "waiting": 2}]

        store = await open_store(wf)
        waiting = [r for r in ids if await store.status(r) == "pending"]
        assert len(waiting) == 3
        timeline = await cli("runs", "show", waiting[0])
        assert timeline.returncode == 0, timeline.stderr
        assert timeline.stdout.splitlines()[2:4] == [
            f"queue {invoices.name}",
            f"waiting: concurrency of {invoices.name} (2/2)",
        ]
        running = (await cli("runs", "show", next(r for r in ids if r not in waiting))).stdout.splitlines()
        assert running[2] == f"queue {invoices.name}" and running[3].split()[:2] == ["seq", "step"]  # nothing holds it
        run = json.loads((await cli("runs", "show", waiting[0], "--json")).stdout)["run"]
        assert (run["queue"], run["waiting_on"], run["due"]) == (
            invoices.name,
            f"concurrency of {invoices.name} (2/2)",
            None,
        )
        gates["open"].set()
        await until_all(wf, ids, timeout=30)


async def test_a_delayed_run_shows_its_due_time_in_runs_show(wf: Settings, cli: Cli) -> None:
    run_id = await enqueue_async(echo.options(settings=wf, delay="2h"), 1)
    shown = await cli("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert re.fullmatch(r"queue default · due \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown.stdout.splitlines()[2])
    assert re.fullmatch(r"waiting: delayed until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown.stdout.splitlines()[3])
    listing = (await cli("queues", "list")).stdout.splitlines()
    assert listing[1].split() == ["default", "1", "-", "0", "0", "1", "-"]


async def test_an_unknown_queue_is_a_one_line_error_naming_the_known_ones(wf: Settings, cli: Cli) -> None:
    other = Queue(unique("known"), per_key=1)
    await enqueue_async(echo.options(settings=wf, queue=other), 5)  # declares it on the server
    one_line_error(
        await cli("queues", "show", "nope"), "there is no queue 'nope'", f"known queues: default, {other.name}"
    )
    one_line_error(await cli("dead", "list", "--queue", "nope"), "there is no queue 'nope'", other.name)


# -- dead letters across queues --------------------------------------------------------------------------------------


async def test_dead_list_shows_each_letters_queue_and_redrive_finds_it(wf: Settings, cli: Cli) -> None:
    billing = Queue(unique("dead"))
    run_id = await enqueue_async(echo.options(settings=wf, queue=billing), 9)
    store = await open_store(wf)
    [tag] = billing.tags()
    await store.bury("lost-run", "hook:t1", "no run took it (test)")
    await store.bury(run_id, "queue", "poison (test)", queue=tag)
    table = (await cli("dead", "list")).stdout.splitlines()
    assert table[0].split() == ["ID", "QUEUE", "RUN", "REASON"]
    assert [line.split()[1:3] for line in table[1:]] == [["default", "lost-run"], [billing.name, run_id]]
    letters = json.loads((await cli("dead", "list", "--json")).stdout)
    assert [(d["queue"], d["run_id"], d["reason"]) for d in letters] == [
        ("default", "lost-run", "no run took it (test)"),
        (billing.name, run_id, "poison (test)"),
    ]
    assert [(d["source"], d["deliveries"], "r" in d) for d in letters] == [
        ("hook:t1", None, False),
        ("queue", None, False),
    ]
    only = json.loads((await cli("dead", "list", "--queue", billing.name, "--json")).stdout)
    assert [d["run_id"] for d in only] == [run_id]
    default_only = (await cli("dead", "list", "--queue", "default")).stdout.splitlines()
    assert default_only[0].split() == ["ID", "RUN", "REASON"]  # the default queue alone: the table as it was

    mine = letters[1]["id"]
    redriven = await cli("dead", "redrive", mine)
    assert (redriven.returncode, redriven.stdout.strip()) == (
        0,
        f"{mine}: re-driven (run {run_id} back on queue {billing.name})",
    )
    assert mine.endswith(f"@{billing.name}")
    assert [d["run_id"] for d in json.loads((await cli("dead", "list", "--json")).stdout)] == ["lost-run"]
    entries = cast("list[Any]", await store.client.xrange(store.queue_key("queue", tag)))
    assert [entry_fields(fields)[b"r"] for _, fields in entries][-1] == run_id.encode()  # back on its own queue
    everything = await cli("dead", "redrive", "--all")
    assert (everything.returncode, everything.stdout.strip()) == (
        0,
        f"{letters[0]['id']}: re-driven (run lost-run back on queue default)",
    )
    assert (await cli("dead", "list")).stdout.strip() == "no dead letters"


# -- werkfluss worker --queue ----------------------------------------------------------------------------------------


async def test_a_worker_serves_only_the_queues_it_is_told(
    wf: Settings, cli: Cli, server: Server, prefix: str, tmp_path: Path
) -> None:
    elsewhere = await enqueue_async(echo.options(settings=wf), 1)  # the default queue: not served
    mine = await enqueue_async(echo.options(settings=wf, queue=served), 2)
    workers = Workers(server_env(server, prefix), tmp_path, module="tests.test_cli_queues")
    try:
        proc = workers.start("--queue", served.name)
        assert f"from queue {served.name}\n" in workers.log(proc)
        await until_status(wf, mine, "completed", timeout=30)
        assert (await statuses(wf, [elsewhere]))["pending"] == 1
    finally:
        workers.stop_all()
    one_line_error(
        await cli("worker", "tests.test_cli_queues", "--queue", "nope", "--queue", served.name),
        "there is no queue 'nope' declared in tests.test_cli_queues",
        f"known queues: default, {served.name}",
    )
