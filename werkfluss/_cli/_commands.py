"""The command line's read and control commands: runs, hooks, queues and dead letters.

Each command is a coroutine taking the parsed arguments and returning the
exit code; tables for people, ``--json`` for scripts.

Commands about runs and letters that exist (everything but ``hooks send``)
never start an embedded server in a directory that holds no werkfluss data:
asked from the wrong directory, they would create an empty store and then
report that the run is not there. They say where they looked instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .._client import cancel_async, invoke_hook_async, pending_hooks_async, resume_async
from .._dead_letters import dead_letters_async, redrive_async
from .._errors import ConfigurationError, RunNotFoundError, WerkflussError
from .._fork import fork_run_async
from .._options import Settings, redact
from .._queries import event_dict, get_events_async, get_run_async, list_runs_async
from .._queue_info import list_queues_async, queue_info_async
from ._timeline import duration, render

if TYPE_CHECKING:
    import argparse

    from .._dead_letters import DeadLetter
    from .._queue_info import QueueInfo

__all__ = ["dead", "existing_settings", "hooks", "print_json", "queues", "runs", "settings_of", "table"]


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings a command's connection options (``--redis-url``, ``--dir``, ``--prefix``) name."""
    return Settings.from_env(redis_url=args.redis_url, directory=args.dir, prefix=args.prefix)


_ELSEWHERE = "point it elsewhere with --dir DIR (WERKFLUSS_DIR), --redis-url URL (WERKFLUSS_REDIS_URL) or --prefix P"


def _looked_in(settings: Settings) -> str:
    """Where a command looked, for its messages: the data directory or the redacted URL, and a prefix of one's own."""
    where = redact(settings.redis_url) if settings.redis_url else str(Path(settings.directory).resolve())
    if settings.prefix != Settings.prefix:
        where += f" (key prefix {settings.prefix!r})"
    return where


def _existing(args: argparse.Namespace) -> Settings:
    """The settings of `args`, refusing an embedded server's directory that holds no data.

    Answering a question must not create a server or data. A directory whose
    server merely stopped still has its data (and password): the server is
    started again on it, as `start()` would.
    """
    settings = settings_of(args)
    if settings.redis_url is None:
        directory = Path(settings.directory).resolve()
        if not (directory / "password").is_file():
            raise ConfigurationError(
                f"no werkfluss data in {directory}: no embedded server has run there, and none was started. "
                f"Run the command in the directory your workflows ran in, or {_ELSEWHERE}"
            )
    return settings


existing_settings = _existing  # for the commands in other modules (`_schedules`)


def _not_found(exc: RunNotFoundError, settings: Settings) -> WerkflussError:
    return WerkflussError(f"{exc} in {_looked_in(settings)}: `werkfluss runs list` shows the runs there; {_ELSEWHERE}")


# -- output ----------------------------------------------------------------------------


def print_json(value: Any) -> None:
    """`value` as one line of JSON on stdout (unknown values as their repr)."""
    sys.stdout.write(msgspec.json.encode(value, enc_hook=repr).decode() + "\n")


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


table = _table  # for the commands in other modules (`_schedules`)


def _when(moment: datetime | float) -> str:
    if isinstance(moment, float):
        moment = datetime.fromtimestamp(moment, UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S}"


def _colour(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


# -- werkfluss runs --------------------------------------------------------------------


async def runs(args: argparse.Namespace) -> int:
    """``werkfluss runs list|show|cancel|resume|fork``."""
    settings = _existing(args)
    try:
        return await _runs(args, settings)
    except RunNotFoundError as exc:
        raise _not_found(exc, settings) from None


async def _runs(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        page = await list_runs_async(
            workflow=args.workflow, status=args.status, limit=args.limit, cursor=args.cursor, settings=settings
        )
        if args.json:
            print_json(page)
            return 0
        if not page.runs:
            print("no runs" + (" on this page" if page.cursor else ""))
        else:
            _table(
                ["RUN ID", "STATUS", "WORKFLOW", "CREATED (UTC)", "UPDATED (UTC)"],
                [[r.run_id, r.status, r.workflow, _when(r.created), _when(r.updated)] for r in page.runs],
            )
        if page.cursor:
            print(f"more: --cursor {page.cursor}")
        return 0
    if args.action == "show":
        run = await get_run_async(args.run_id, settings=settings)
        events = await get_events_async(args.run_id, settings=settings)
        if args.json:
            print_json({"run": run, "events": [event_dict(e) for e in events]})
            return 0
        for line in render(run, events, colour=_colour(args.color)):
            print(line)
        return 0
    if args.action == "cancel":
        acted = await cancel_async(args.run_id, args.reason, settings=settings)
        # cancel_async says only that there was something to cancel. A run a live process
        # holds is only asked to stop (at its next step boundary): its status says which.
        status = (await get_run_async(args.run_id, settings=settings)).status
        print(f"run {args.run_id}: {_cancelled(status) if acted else f'already {status}, nothing to cancel'}")
        return 0
    if args.action == "fork":
        forked = await fork_run_async(args.run_id, args.from_seq, new_run_id=args.new_run_id, settings=settings)
        print(forked)
        return 0
    before = await resume_async(args.run_id, settings=settings)
    print(f"run {args.run_id} ({before}) is back on the queue: a worker will resume it")
    return 0


def _cancelled(status: str) -> str:
    """What a cancel that acted did, worded from the run's status read right after it."""
    if status == "cancelled":
        return "cancelled"
    if status in ("completed", "failed"):
        # Its holder reached the end before it reached a step boundary.
        return f"cancel requested, but it ended first (status: {status})"
    return f"cancel requested; it stops at its next step (status: {status})"


# -- werkfluss hooks -------------------------------------------------------------------


async def hooks(args: argparse.Namespace) -> int:
    """``werkfluss hooks send TOKEN JSON`` and ``werkfluss hooks list``."""
    # A payload may be sent before any run exists (it waits in the mailbox): `send`
    # may start a server; `list` only reads.
    settings = settings_of(args) if args.action == "send" else _existing(args)
    if args.action == "send":
        if args.token is None or args.payload is None:
            raise ConfigurationError("usage: werkfluss hooks send TOKEN JSON  (JSON '-' reads standard input)")
        text = sys.stdin.read() if args.payload == "-" else args.payload
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"the payload for hook {args.token!r} is not valid JSON: {exc}") from None
        if await invoke_hook_async(args.token, payload, key=args.key, settings=settings):
            print(f"delivered to hook {args.token!r}")
        else:  # a retry is no error: exit 0, so a sender's retry loop stops
            print(f"hook {args.token!r} already has the delivery with key {args.key!r}: nothing stored")
        return 0
    found = await pending_hooks_async(limit=args.limit, settings=settings)
    if args.json:
        print_json([dataclasses.asdict(h) for h in found])
        return 0
    if not found:
        print("no payloads waiting")
        return 0
    now = time.time()
    _table(
        ["TOKEN", "PAYLOADS", "LAST DELIVERY", "CLAIMED BY"],
        [[h.token, str(h.payloads), f"{duration(now - h.last_delivery)} ago", h.owner or "-"] for h in found],
    )
    return 0


# -- werkfluss dead --------------------------------------------------------------------


async def dead(args: argparse.Namespace) -> int:
    """``werkfluss dead list`` and ``werkfluss dead redrive ID...|--all``."""
    settings = _existing(args)
    if args.action == "list":
        letters = await dead_letters_async(queue=args.queue, limit=args.limit, settings=settings)
        if args.json:
            # The documented DeadLetter fields (``at`` as ISO-8601 UTC); the raw stream fields stay under "fields".
            print_json(letters)
        elif not letters:
            print("no dead letters")
        else:
            _dead_table(letters)
        return 0
    if not args.all and not args.ids:
        raise ConfigurationError("name the dead letters to re-drive, or pass --all")
    # Read before re-driving (which removes them): redrive_async returns only the dead
    # letter's ID, and the output names the run and the queue it goes back on.
    found = await dead_letters_async(queue=args.queue, limit=100_000, settings=settings)
    if args.all:
        if not found:
            # Nothing to do is not a failure: after this, no dead letter is left, as asked.
            print("no dead letters to re-drive")
            return 0
        targets: list[tuple[str, str | None]] = [(letter.id, letter.queue) for letter in found]
    else:
        targets = [(dead_id, args.queue) for dead_id in args.ids]
    missing = 0
    for dead_id, queue in targets:
        letter = _named(found, dead_id)
        if await redrive_async(dead_id, queue=queue, settings=settings) is None:
            print(f"{dead_id}: no such dead letter")
            missing += 1
        elif letter is None:  # beyond the listing read above: re-driven all the same
            print(f"{dead_id}: re-driven")
        else:
            print(f"{dead_id}: re-driven (run {letter.run_id or '?'} back on queue {letter.queue})")
    return 1 if missing else 0


def _named(letters: list[DeadLetter], dead_id: str) -> DeadLetter | None:
    """The dead letter `dead_id` names: by its full ID, or a bare entry ID as redrive_async finds it
    (the default queue's first, then in the listing's order)."""
    exact = [letter for letter in letters if letter.id == dead_id]
    bare = [letter for letter in letters if letter.id.partition("@")[0] == dead_id]
    bare.sort(key=lambda letter: letter.queue != "default")
    return next(iter(exact or bare), None)


def _dead_table(letters: list[DeadLetter]) -> None:
    # The queue column shows once a dead letter is on a named queue: with the default
    # queue alone the table reads as it always did.
    named = any(letter.queue != "default" for letter in letters)
    header = ["ID", "QUEUE", "RUN", "REASON"] if named else ["ID", "RUN", "REASON"]
    rows = [[letter.id, *([letter.queue] if named else []), letter.run_id or "?", letter.reason] for letter in letters]
    _table(header, rows)


# -- werkfluss queues ------------------------------------------------------------------


async def queues(args: argparse.Namespace) -> int:
    """``werkfluss queues list`` and ``werkfluss queues show NAME``."""
    settings = _existing(args)
    if args.action == "list":
        found = await list_queues_async(settings=settings)
        if args.json:
            print_json(found)
            return 0
        _table(
            ["QUEUE", "PARTITIONS", "LIMITS", "WAITING", "RUNNING", "DELAYED", "OLDEST WAITING"],
            [[q.name, str(q.partitions), _limits(q) or "-", *_counts(q), _age(q.oldest_waiting)] for q in found],
        )
        return 0
    info = await queue_info_async(args.name, top=args.top, settings=settings)
    if args.json:
        print_json(info)
        return 0
    print(f"queue {info.name}: {info.declared}")
    facts = [
        ("partitions", str(info.partitions)),
        ("limits", _limits(info) or "none"),
        ("waiting", str(info.waiting)),
        ("running", str(info.running)),
        ("delayed", str(info.delayed)),
    ]
    if info.limited:
        facts.append(("ready", f"{info.ready} (admitted, not yet read by a worker)"))
    facts.append(("oldest waiting", _age(info.oldest_waiting)))
    width = max(len(label) for label, _ in facts)
    for label, value in facts:
        print(f"{label:<{width}}  {value}")
    if info.busiest_keys:
        print()
        print("busiest keys:")
        _table(
            ["KEY", "RUNNING", "WAITING"],
            [[k.key or "(no key)", str(k.running), str(k.waiting)] for k in info.busiest_keys],
        )
    return 0


def _limits(queue: QueueInfo) -> str:
    """A queue's limits in one cell: ``concurrency=20 per_key=2 rate=100/min priority``."""
    parts = [
        f"{name}={value}"
        for name, value in (
            ("concurrency", queue.concurrency),
            ("per_key", queue.per_key),
            ("rate", queue.rate),
            ("key_rate", queue.key_rate),
        )
        if value
    ]
    return " ".join(parts + (["priority"] if queue.priority else []))


def _counts(queue: QueueInfo) -> list[str]:
    return [str(queue.waiting), str(queue.running), str(queue.delayed)]


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else duration(seconds)
