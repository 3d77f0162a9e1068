"""``werkfluss check MODULE...``: the pre-deploy check, for people and for CI.

Prints a row per in-flight run as it is checked (run, workflow, status,
verdict) and a summary line; ``--json`` prints one object, streamed the same
way: ``{"runs": [...], "counts": {...}, "ok": ...}``. Exit codes: 0 when the
current code replays every in-flight run, 1 when any would block (a
divergence or a recorded value that no longer decodes), 2 when the check
could not be made (a module that does not import, a bad option, no server).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import msgspec

from .._check import DeployCheck, in_flight_workflows, iter_check_async
from .._errors import WerkflussError
from .._sync import blocking
from ._commands import existing_settings

if TYPE_CHECKING:
    import argparse

    from .._check import RunVerdict
    from .._options import Settings
    from .._wrappers import Workflow

__all__ = ["check", "verdict_dict"]

USAGE = 2  # the check could not be made; 1 means runs would block
_WIDTHS = (28, 20, 8)  # run, workflow, status: rows are printed as they come, so the widths are fixed


def check(args: argparse.Namespace) -> int:
    """Run ``werkfluss check``; returns its exit code."""
    try:
        flows: dict[str, Workflow[Any, Any]] = {}
        for spec in args.modules:
            flows.update((w.id, w) for w in in_flight_workflows(spec))
        if args.workflow is not None and args.workflow not in flows:
            known = ", ".join(sorted(flows))
            raise WerkflussError(f"{', '.join(args.modules)} defines no workflow {args.workflow!r}; it defines {known}")
        if args.limit is not None and args.limit < 1:
            raise WerkflussError(f"invalid --limit {args.limit}: use a positive number of runs")
        settings = existing_settings(args)
        report = blocking("check", lambda: _stream(list(flows.values()), args, settings))
    except WerkflussError as exc:
        print(f"werkfluss: {exc}", file=sys.stderr)
        return USAGE
    return 0 if report.ok else 1


async def _stream(flows: list[Workflow[Any, Any]], args: argparse.Namespace, settings: Settings) -> DeployCheck:
    report = DeployCheck(sorted(w.id for w in flows if args.workflow in (None, w.id)))
    out = sys.stdout
    if args.json:
        out.write('{"runs": [')
    else:
        print(_row(["RUN", "WORKFLOW", "STATUS", "VERDICT"]))
    first = True
    checked = iter_check_async(flows, workflow=args.workflow, limit=args.limit, settings=settings, report=report)
    async for verdict in checked:
        if args.json:
            out.write(("" if first else ", ") + msgspec.json.encode(verdict_dict(verdict)).decode())
        else:
            print(_row([verdict.run_id, verdict.workflow, verdict.status, verdict.describe()]))
        first = False
    if args.json:
        tail = {"counts": report.counts(), "truncated": report.truncated, "ok": report.ok, "summary": report.summary()}
        out.write("], " + msgspec.json.encode(tail).decode()[1:] + "\n")
    else:
        print(report.summary())
    return report


def verdict_dict(verdict: RunVerdict) -> dict[str, Any]:
    """The JSON form of a run's verdict: its fields and ``message`` (the table's text)."""
    return {**msgspec.to_builtins(verdict), "message": verdict.describe()}


def _row(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, (*_WIDTHS, 0), strict=True)).rstrip()
