"""The `werkfluss` command line (also ``python -m werkfluss``).

Commands:
    werkfluss server start|stop|status [--dir DIR]   the embedded Valkey server
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._embedded import ensure_server, server_status, stop_server
from ._errors import WerkflussError

__all__ = ["main", "run"]


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
    return parser


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
        return _server(args.action, Path(args.dir).resolve())
    except (WerkflussError, ValueError, OSError) as exc:
        print(f"werkfluss: {exc}", file=sys.stderr)
        return 1


def run() -> None:
    """Console-script entry point: exit with `main`'s code."""
    sys.exit(main())
