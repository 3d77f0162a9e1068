"""``werkfluss schedules list|show|pause|resume|trigger``: the schedules the workers declared on the server.

The command line does not import the modules that declare schedules: it
reads their declarations and state from the server (`_schedule_info`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._schedule_info import (
    list_schedules_async,
    pause_schedule_async,
    resume_schedule_async,
    schedule_info_async,
    trigger_schedule_async,
)
from .._schedules import spell_seconds
from ._commands import existing_settings, print_json, table

if TYPE_CHECKING:
    import argparse
    from datetime import datetime

    from .._schedule_info import ScheduleInfo

__all__ = ["schedules"]


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _timing(info: ScheduleInfo) -> str:
    if info.cron is not None:
        return f"{info.cron} ({info.timezone})"
    return f"every {spell_seconds(info.every)}"


def _state(info: ScheduleInfo) -> str:
    return "paused" if info.paused else "served" if info.served else "not served"


def _last(info: ScheduleInfo) -> str:
    return "-" if info.last_run is None else f"{info.last_run} ({info.last_status or 'not there yet'})"


async def schedules(args: argparse.Namespace) -> int:
    """``werkfluss schedules list``, ``show NAME``, ``pause NAME``, ``resume NAME``, ``trigger NAME``."""
    settings = existing_settings(args)
    if args.action == "list":
        found = await list_schedules_async(settings=settings)
        if args.json:
            print_json(found)
            return 0
        if not found:
            print("no schedules: a worker declares the schedules of the modules it serves")
            return 0
        table(
            ["SCHEDULE", "WORKFLOW", "WHEN", "NEXT", "LAST RUN", "STATE"],
            [[i.name, i.workflow, _timing(i), _when(i.next_tick), _last(i), _state(i)] for i in found],
        )
        return 0
    if args.action == "show":
        info = await schedule_info_async(args.name, settings=settings)
        if args.json:
            print_json(info)
            return 0
        print(f"schedule {info.name}: {info.declared}")
        facts = [
            ("workflow", f"{info.workflow} (queue {info.queue})"),
            ("when", _timing(info)),
            ("policies", f"catch_up={info.catch_up} overlap={info.overlap} max_catch_up={info.max_catch_up}"),
            ("state", _state(info)),
            ("next tick", _when(info.next_tick)),
            ("last tick", _when(info.last_tick)),
            ("last run", _last(info)),
            ("fired", str(info.fired)),
            ("skipped", str(info.skipped)),
            ("triggers waiting", str(info.triggers_waiting)),
        ]
        width = max(len(label) for label, _ in facts)
        for label, value in facts:
            print(f"{label:<{width}}  {value}")
        return 0
    if args.action == "pause":
        await pause_schedule_async(args.name, settings=settings)
        print(f"schedule {args.name} paused: its ticks are skipped until it is resumed")
    elif args.action == "resume":
        await resume_schedule_async(args.name, settings=settings)
        print(f"schedule {args.name} resumed: it fires from its next tick")
    else:
        run_id = await trigger_schedule_async(args.name, settings=settings)
        served = any(s.served for s in await list_schedules_async(settings=settings) if s.name == args.name)
        if served:
            print(f"schedule {args.name} triggered: a worker starts run {run_id} at its next look")
        else:
            print(f"schedule {args.name} triggered: no worker serves it now; run {run_id} starts when one does")
    return 0
