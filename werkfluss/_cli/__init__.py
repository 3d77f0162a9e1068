"""The `werkfluss` command line (also ``python -m werkfluss``).

Commands:
    werkfluss runs list|show|cancel|resume|fork ...  see and steer runs
    werkfluss hooks send TOKEN JSON | list           deliver to hooks, see what waits
    werkfluss worker MODULE[:ATTR] ... [--queue NAME]  serve the workflows these modules define
    werkfluss check MODULE[:ATTR] ... [--json]       replay the in-flight runs against this code (pre-deploy)
    werkfluss queues list | show NAME                the queues: limits, waiting, running, busiest keys
    werkfluss dead list | redrive ID... | redrive --all   dead letters of the queues
    werkfluss schedules list | show|pause|resume|trigger NAME   cron and interval schedules
    werkfluss server start|stop|status [--dir DIR]   the embedded Valkey server

Connection options (``--redis-url``, ``--dir``, ``--prefix``) default to the
same environment variables as the library; read commands take ``--json``.
Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

import anyio

from .._errors import ConfigurationError, WerkflussError
from .._ids import registered_workflows
from .._queries import STATUSES
from .._queues import Queue, declared_queues, queue_named
from .._store._embedded import ensure_server, server_status, stop_server
from .._sync import blocking
from .._worker import Worker
from ._check import check
from ._commands import dead, hooks, print_json, queues, runs, settings_of
from ._schedules import schedules

__all__ = ["main", "run"]


def _connection(parser: argparse.ArgumentParser, *, json: bool = False) -> None:
    if json:
        parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    parser.add_argument(
        "--redis-url", help="Redis/Valkey URL (default: $WERKFLUSS_REDIS_URL, else the embedded server)"
    )
    parser.add_argument("--dir", help="data directory of the embedded server (default: $WERKFLUSS_DIR or ./.werkfluss)")
    parser.add_argument("--prefix", help="key prefix (default: $WERKFLUSS_PREFIX or werkfluss:)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="werkfluss", description="Durable workflows on Redis streams.")
    commands = parser.add_subparsers(dest="command", required=True)

    runs = commands.add_parser("runs", help="list runs, draw a run's timeline, cancel, resume or fork a run")
    runs_actions = runs.add_subparsers(dest="action", required=True)
    listing = runs_actions.add_parser("list", help="runs, newest first")
    listing.add_argument("--status", choices=STATUSES, help="only runs in this status")
    listing.add_argument("--workflow", help="only runs of this workflow ID (module:qualname or its name)")
    listing.add_argument("--limit", type=int, default=50, help="runs per page (default 50)")
    listing.add_argument("--cursor", help="the next page, as the previous page printed it")
    show = runs_actions.add_parser("show", help="a run's timeline: steps, retries, pauses, errors")
    show.add_argument("run_id")
    show.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour (default auto)")
    cancel = runs_actions.add_parser("cancel", help="cancel a run")
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="cancelled from the command line", help="recorded in the run's log")
    resume = runs_actions.add_parser("resume", help="put a failed, blocked or stuck run back on the queue")
    resume.add_argument("run_id")
    fork = runs_actions.add_parser(
        "fork", help="a new run that replays the calls before --from-seq and executes the rest with the current code"
    )
    fork.add_argument("run_id")
    fork.add_argument("--from-seq", type=int, required=True, metavar="N", help="the first call to execute again")
    fork.add_argument("--run-id", dest="new_run_id", metavar="NEW", help="the new run's ID (default <run>~fork-<k>)")
    for sub, reads in ((listing, True), (show, True), (cancel, False), (resume, False), (fork, False)):
        _connection(sub, json=reads)

    hooks = commands.add_parser("hooks", help="deliver a hook payload, list payloads no run took yet")
    hooks.add_argument("action", choices=["send", "list"])
    hooks.add_argument("token", nargs="?", help="the hook's token (send)")
    hooks.add_argument("payload", nargs="?", help="the payload as JSON, '-' for standard input (send)")
    hooks.add_argument("--limit", type=int, default=100, help="how many to list (default 100)")
    hooks.add_argument("--key", help="delivery key (send): a second send with the same key stores nothing")
    _connection(hooks, json=True)

    worker = commands.add_parser("worker", help="serve workflows from the queue until SIGINT/SIGTERM")
    worker.add_argument("modules", nargs="+", metavar="MODULE[:ATTR]", help="modules that define the workflows")
    worker.add_argument("--concurrency", type=int, default=32, help="runs executed at once (default 32)")
    worker.add_argument("--grace", type=float, default=10.0, help="seconds to let runs stop on shutdown (default 10)")
    worker.add_argument("--max-deliveries", type=int, default=5, help="deliveries before a dead letter (default 5)")
    worker.add_argument(
        "--queue",
        action="append",
        dest="queues",
        metavar="NAME",
        help="serve this queue (repeat for more; default: every queue the modules declare, and the default queue)",
    )
    worker.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="logging level (default INFO)",
    )
    _connection(worker)

    checking = commands.add_parser(
        "check", help="replay every in-flight run against this code, executing no step: exit 1 if any would block"
    )
    checking.add_argument("modules", nargs="+", metavar="MODULE[:ATTR]", help="modules that define the workflows")
    checking.add_argument("--workflow", metavar="ID", help="only the runs of this workflow ID")
    checking.add_argument("--limit", type=int, metavar="N", help="check at most N runs (default: all)")
    _connection(checking, json=True)

    queues = commands.add_parser("queues", help="the queues: limits in force, runs waiting and running")
    queues_actions = queues.add_subparsers(dest="action", required=True)
    queue_list = queues_actions.add_parser("list", help="every queue: limits, waiting, running, delayed")
    queue_show = queues_actions.add_parser("show", help="one queue, with its busiest keys")
    queue_show.add_argument("name", help="the queue's name (werkfluss queues list names them)")
    queue_show.add_argument("--top", type=int, default=10, help="how many of the busiest keys to show (default 10)")
    for sub in (queue_list, queue_show):
        _connection(sub, json=True)

    scheduled = commands.add_parser("schedules", help="the schedules: next ticks, last runs; pause, resume, trigger")
    scheduled_actions = scheduled.add_subparsers(dest="action", required=True)
    schedule_list = scheduled_actions.add_parser("list", help="every schedule: when, next tick, last run, state")
    _connection(schedule_list, json=True)
    for action, what in (
        ("show", "one schedule: its declaration, policies, counts"),
        ("pause", "skip its ticks until it is resumed"),
        ("resume", "fire again from its next tick"),
        ("trigger", "start a run now (a worker starts it at its next look)"),
    ):
        sub = scheduled_actions.add_parser(action, help=what)
        sub.add_argument("name", help="the schedule's name (werkfluss schedules list names them)")
        _connection(sub, json=action == "show")

    dead = commands.add_parser("dead", help="list or re-drive the queues' dead letters")
    dead.add_argument("action", choices=["list", "redrive"])
    dead.add_argument("ids", nargs="*", help="dead-letter IDs to re-drive")
    dead.add_argument("--all", action="store_true", help="re-drive every dead letter")
    dead.add_argument("--queue", metavar="NAME", help="only this queue's dead letters (default: every queue's)")
    dead.add_argument("--limit", type=int, default=100, help="how many to list (default 100)")
    _connection(dead, json=True)

    server = commands.add_parser("server", help="manage the embedded Valkey server")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument(
        "--dir",
        default=os.environ.get("WERKFLUSS_DIR", ".werkfluss"),
        help="data directory of the embedded server (default: $WERKFLUSS_DIR or ./.werkfluss)",
    )
    server.add_argument("--json", action="store_true", help="print JSON (status)")
    return parser


def _import(spec: str) -> None:
    """Import `spec` (``package.module`` or ``package.module:attribute``) for the workflows it defines."""
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current project
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from None
    if attr and not hasattr(module, attr):
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}")


def _worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for spec in args.modules:
        _import(spec)
    names = registered_workflows()
    if not names:
        raise ConfigurationError(
            f"{', '.join(args.modules)} {'defines' if len(args.modules) == 1 else 'define'} no workflows"
        )
    served = None if args.queues is None else [_queue(name, args.modules) for name in args.queues]
    worker = Worker(
        settings=settings_of(args),
        concurrency=args.concurrency,
        grace=args.grace,
        max_deliveries=args.max_deliveries,
        queues=served,
    )

    forced: list[int] = []  # the signal that stopped the worker at once, if one did

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            serving = anyio.Event()
            tg.start_soon(_on_signals, worker, tg.cancel_scope, serving, forced)
            async with worker:
                serving.set()
                print(
                    f"werkfluss worker {worker.name} serving {', '.join(names)} "
                    f"from queue{'s' if len(worker.queues) != 1 else ''} {', '.join(q.name for q in worker.queues)}",
                    file=sys.stderr,
                    flush=True,
                )
                await worker.wait()
            tg.cancel_scope.cancel()

    try:
        blocking("worker", serve)
    except BaseExceptionGroup as group:
        # The task group wraps what failed in it (the connection, at start): a lone
        # werkfluss error is reported like every other command's, in one line.
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], WerkflussError):
            raise leaves[0] from None
        raise
    if forced:
        # Stopped at once: runs were cut short and handed back; not a clean exit.
        return 128 + forced[0]
    return 0


def _queue(name: str, modules: list[str]) -> Queue:
    """The queue `name` the imported modules declared (or the default one)."""
    try:
        return queue_named(name)
    except ConfigurationError:
        known = ", ".join(q.name for q in declared_queues())
        raise ConfigurationError(
            f"there is no queue {name!r} declared in {', '.join(modules)}; known queues: {known}"
        ) from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in `group` and its nested groups."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def _on_signals(worker: Worker, scope: anyio.CancelScope, serving: anyio.Event, forced: list[int]) -> None:
    """First SIGINT/SIGTERM: stop gracefully; a second one: stop now, noting the signal in `forced`."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        async for signum in received:
            if not worker.stopping:
                worker.stop()
                print(
                    f"werkfluss worker: stopping; running steps may finish (up to {worker.grace:g} s). "
                    f"Press Ctrl-C again to stop at once",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            forced.append(signum)
            worker.stop(now=True)  # hands its runs back to the queue, pending
            if not serving.is_set():
                scope.cancel()  # still connecting: nothing to hand back
            print(
                "werkfluss worker: stopping at once; unfinished runs go back to the queue, "
                "and their current steps execute again",
                file=sys.stderr,
                flush=True,
            )
            return


def _server(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    if args.action == "start":
        running = ensure_server(directory, fsync=os.environ.get("WERKFLUSS_FSYNC", "everysec"))
        print(f"running: pid {running.pid}, socket {running.socket_path}")
        return 0
    if args.action == "stop":
        print("stopped" if stop_server(directory) else f"no server running for {directory}")
        return 0
    found = server_status(directory)
    if args.json:
        print_json(
            {"running": found is not None, "directory": str(directory)}
            | ({"pid": found.pid, "socket": str(found.socket_path)} if found else {})
        )
    elif found is None:
        print(f"not running ({directory})")
    else:
        print(f"running: pid {found.pid}, socket {found.socket_path}, data in {found.directory}")
    return 0 if found else 1


def _command(args: argparse.Namespace) -> int:
    if args.command == "worker":
        return _worker(args)
    if args.command == "server":
        return _server(args)
    if args.command == "check":
        return check(args)
    command = {"runs": runs, "hooks": hooks, "dead": dead, "queues": queues, "schedules": schedules}[args.command]
    return blocking(args.command, lambda: command(args))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        code = _command(args)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader stopped reading (`werkfluss runs list | head`): it has what it wanted.
        # Later writes (the interpreter's final flush) go nowhere instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (WerkflussError, OSError) as exc:
        print(f"werkfluss: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console-script entry point: exit with `main`'s code."""
    sys.exit(main())
