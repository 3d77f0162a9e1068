"""The `werkfluss` command line (also ``python -m werkfluss``).

Commands:
    werkfluss server start|stop|status [--dir DIR]   the embedded Valkey server
    werkfluss worker MODULE[:ATTR] ...               serve the workflows these modules define
    werkfluss dead list | redrive ID... | redrive --all   dead letters of the queue

Connection options (``--redis-url``, ``--dir``, ``--prefix``) default to the
same environment variables as the library.
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

from ._client import close_stores, open_store
from ._embedded import ensure_server, server_status, stop_server
from ._errors import ConfigurationError, WerkflussError
from ._options import Settings
from ._worker import Worker
from ._wrappers import registered_workflows

__all__ = ["main", "run"]


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", help="Redis/Valkey URL (default: $WERKFLUSS_REDIS_URL, else the embedded server)"
    )
    parser.add_argument("--dir", help="data directory of the embedded server (default: $WERKFLUSS_DIR or ./.werkfluss)")
    parser.add_argument("--prefix", help="key prefix (default: $WERKFLUSS_PREFIX or werkfluss:)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="werkfluss", description="Durable workflows on Redis streams.")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server", help="manage the embedded Valkey server")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument(
        "--dir",
        default=os.environ.get("WERKFLUSS_DIR", ".werkfluss"),
        help="data directory of the embedded server (default: $WERKFLUSS_DIR or ./.werkfluss)",
    )
    worker = commands.add_parser("worker", help="serve workflows from the queue until SIGINT/SIGTERM")
    worker.add_argument("modules", nargs="+", metavar="MODULE[:ATTR]", help="modules that define the workflows")
    worker.add_argument("--concurrency", type=int, default=32, help="runs executed at once (default 32)")
    worker.add_argument("--grace", type=float, default=10.0, help="seconds to let runs stop on shutdown (default 10)")
    worker.add_argument("--max-deliveries", type=int, default=5, help="deliveries before a dead letter (default 5)")
    worker.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    _connection(worker)
    dead = commands.add_parser("dead", help="list or re-drive the queue's dead letters")
    dead.add_argument("action", choices=["list", "redrive"])
    dead.add_argument("ids", nargs="*", help="dead-letter IDs to re-drive")
    dead.add_argument("--all", action="store_true", help="re-drive every dead letter")
    dead.add_argument("--limit", type=int, default=100, help="how many to list (default 100)")
    _connection(dead)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(redis_url=args.redis_url, directory=args.dir, prefix=args.prefix)


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
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for spec in args.modules:
        _import(spec)
    names = registered_workflows()
    if not names:
        raise ConfigurationError(f"{', '.join(args.modules)} define no workflows")
    worker = Worker(
        settings=_settings(args), concurrency=args.concurrency, grace=args.grace, max_deliveries=args.max_deliveries
    )

    async def serve() -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_on_signals, worker, tg.cancel_scope)
                async with worker:
                    print(f"werkfluss worker {worker.name} serving {', '.join(names)}", file=sys.stderr, flush=True)
                    await worker.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await close_stores()

    anyio.run(serve, backend="asyncio")
    return 0


async def _on_signals(worker: Worker, scope: anyio.CancelScope) -> None:
    """First SIGINT/SIGTERM: stop gracefully; a second one: stop now."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        async for _ in received:
            if worker.stopping:
                scope.cancel()
                return
            worker.stop()


def _dead(args: argparse.Namespace) -> int:
    async def main() -> int:
        try:
            store = await open_store(_settings(args))
            if args.action == "list":
                letters = await store.dead_letters(args.limit)
                for dead_id, fields in letters:
                    print(f"{dead_id}  run {fields.get('r', '?')}  {fields.get('reason', '')}")
                if not letters:
                    print("no dead letters")
                return 0
            ids = [i for i, _ in await store.dead_letters(100_000)] if args.all else args.ids
            if not ids:
                raise ConfigurationError("name the dead letters to re-drive, or pass --all")
            missing = 0
            for dead_id in ids:
                message = await store.redrive(dead_id)
                print(f"{dead_id}: re-driven as {message}" if message else f"{dead_id}: no such dead letter")
                missing += not message
            return 1 if missing else 0
        finally:
            await close_stores()

    return anyio.run(main, backend="asyncio")


def _server(action: str, directory: Path) -> int:
    if action == "start":
        running = ensure_server(directory, fsync=os.environ.get("WERKFLUSS_FSYNC", "everysec"))
        print(f"running: pid {running.pid}, socket {running.socket_path}")
        return 0
    if action == "stop":
        print("stopped" if stop_server(directory) else f"no server running for {directory}")
        return 0
    found = server_status(directory)
    if found is None:
        print(f"not running ({directory})")
        return 1
    print(f"running: pid {found.pid}, socket {found.socket_path}, data in {found.directory}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "dead":
            return _dead(args)
        return _server(args.action, Path(args.dir).resolve())
    except (WerkflussError, ValueError, OSError) as exc:
        print(f"werkfluss: {exc}", file=sys.stderr)
        return 1


def run() -> None:
    """Console-script entry point: exit with `main`'s code."""
    sys.exit(main())
