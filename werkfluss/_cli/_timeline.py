"""Draw a run's history as a timeline for the terminal (`werkfluss runs show`).

Pure: it takes the run's record and decoded events and returns lines.
One row per step (sequence number, name, executed or replayed, attempts,
duration, and a bar on a time axis common to all rows), rows for hooks,
timers and races, pauses as gaps with what the run waited for, a marker
for every time a process took the run over, and the error text of a
failed step. Under the title: the run's queue (unless the default one) and
its delayed start's due time, and what holds a pending run on its queue
(``waiting: concurrency of invoices (20/20)``). Fits 80 columns; colour is
for terminals only.
"""

from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._events import (
    AnyEvent,
    HookReceived,
    PatchMarked,
    RaceWon,
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunResumed,
    RunStarted,
    StepCompleted,
    StepFailed,
    TimerStarted,
    Waiting,
    describe,
)

if TYPE_CHECKING:
    from .._queries import RunInfo, Wait

__all__ = ["WIDTH", "Row", "duration", "render", "rows"]

WIDTH = 80
_SEQ, _NAME, _OUTCOME, _TRIES, _TIME = 4, 22, 9, 3, 7
_BAR = WIDTH - (_SEQ + _NAME + _OUTCOME + _TRIES + _TIME + 5) - 2  # 5 gaps, 2 bar edges

_RESET = "\033[0m"
_ANSI = re.compile(r"\033\[[0-9;]*m")
_COLOURS = {
    "executed": "\033[32m",
    "replayed": "\033[36m",
    "failed": "\033[31m",
    "retrying": "\033[33m",
    "paused": "\033[33m",
    "sleep": "\033[34m",
    "mark": "\033[35m",
    "dim": "\033[2m",
    "bold": "\033[1m",
}


@dataclass(frozen=True)
class _Glyphs:
    run: str
    fail: str
    gap: str
    sleep: str
    tick: str
    more: str


_PLAIN = _Glyphs(run="#", fail="x", gap=".", sleep="~", tick="*", more="..")
_FANCY = _Glyphs(run="█", fail="▒", gap="░", sleep="─", tick="◆", more="…")


@dataclass
class Row:
    """One line of the timeline: a step, hook, timer, race, pause, takeover or the end.

    `spans` are ``(start, end, kind)`` in Unix seconds, drawn on the bar;
    `notes` are lines printed under the row (errors, tracebacks).
    """

    kind: str  # step, hook, sleep, race, pause, session, end
    seq: int | None
    name: str
    outcome: str
    tries: int | None = None
    start: float = 0.0
    end: float = 0.0
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def rows(events: list[AnyEvent], *, now: float | None = None) -> list[Row]:
    """The timeline's rows, in the order things first happened."""
    out: list[Row] = []
    steps: dict[int, Row] = {}
    last_session = 0.0
    completed_before: list[int] = []
    pause: Row | None = None
    for event in events:
        if isinstance(event, RunStarted):
            last_session = event.time
            out.append(Row("session", None, "started", "", start=event.time, end=event.time))
        elif isinstance(event, RunResumed):
            last_session = event.time
            if pause is not None:
                pause.end = event.time
                pause.spans = [(pause.start, event.time, "paused")]
                pause = None
            why = _resumed_why(out)
            done = len(completed_before)
            note = f"{done} step{'s' if done != 1 else ''} in the log" if done else "nothing in the log yet"
            out.append(Row("session", None, f"resumed {why}", note, start=event.time, end=event.time))
        elif isinstance(event, (StepCompleted, StepFailed)):
            row = steps.get(event.seq)
            if row is None:
                row = steps[event.seq] = Row("step", event.seq, event.step, "", tries=0, start=event.started)
                out.append(row)
            row.tries = max(row.tries or 0, event.attempt)
            row.end = event.time
            if isinstance(event, StepCompleted):
                row.outcome = "executed"
                row.spans.append((event.started, event.time, "executed"))
                completed_before.append(event.seq)
            else:
                row.spans.append((event.started, event.time, "failed"))
                row.outcome = "failed" if event.final else "retrying"
                row.notes.append(f"attempt {event.attempt}: {event.error.type}: {_one_line(event.error.message)}")
                if event.final and event.error.traceback:
                    row.notes.extend(event.error.traceback.rstrip("\n").splitlines())
        elif isinstance(event, HookReceived):
            out.append(_moment("hook", event.seq, f"hook:{event.token}", "received", event.time))
        elif isinstance(event, TimerStarted):
            sleep = duration(event.due - event.time)
            out.append(_moment("sleep", event.seq, "sleep", sleep, event.time, end=event.due, span="sleep"))
        elif isinstance(event, RaceWon):
            out.append(_moment("race", event.seq, "race", f"won by #{event.index}", event.time))
        elif isinstance(event, PatchMarked):
            # No seq of its own: the call after it has that number.
            when, note = event.time, f"new branch, before #{event.seq}"
            mark = Row("patch", None, f"patched {event.name!r}", note, start=when, end=when)
            mark.spans.append((when, when, "mark"))
            out.append(mark)
        elif isinstance(event, RunPaused):
            pause = Row("pause", None, "paused", "", start=event.time, end=event.time)
            pause.notes.append(f"waiting for {describe(event.waits)}")
            out.append(pause)
        elif isinstance(event, (RunCompleted, RunFailed, RunBlocked, RunCancelled)):
            if pause is not None:  # ended while paused (cancelled, a deadline): the pause ends there too
                pause.end = event.time
                pause.spans = [(pause.start, event.time, "paused")]
                pause = None
            out.append(_end_row(event))
    if pause is not None:  # still paused: the gap runs until now
        pause.end = now if now is not None else time.time()
        pause.spans = [(pause.start, pause.end, "paused")]
    for row in steps.values():
        if row.outcome == "executed" and row.end < last_session:
            row.outcome = "replayed"  # the latest process to run it took it from the log
    return out


def _resumed_why(previous: list[Row]) -> str:
    for row in reversed(previous):
        if row.kind == "pause":
            return "after a pause"
        if row.kind == "end":
            return {"failed": "after a failure", "blocked": "after a code change"}.get(row.outcome, "")
        if row.kind == "session":
            break
    return "after an interruption" if any(r.kind == "step" for r in previous) else "by a worker"


def _end_row(event: RunCompleted | RunFailed | RunBlocked | RunCancelled) -> Row:
    if isinstance(event, RunCompleted):
        row = Row("end", None, "run completed", "completed")
    elif isinstance(event, RunCancelled):
        row = Row("end", None, "run cancelled", "cancelled")
        row.notes.append(f"reason: {event.reason or '(none given)'}")
    else:
        outcome = "failed" if isinstance(event, RunFailed) else "blocked"
        row = Row("end", None, f"run {outcome}", outcome)
        if isinstance(event, RunFailed) and event.seq is not None:
            row.notes.append(f"because step #{event.seq} failed")
        else:  # the workflow's own exception, or the divergence: its text is the story
            row.notes.append(f"{event.error.type}: {_one_line(event.error.message)}")
            if isinstance(event, RunFailed):
                row.notes.extend(event.error.traceback.rstrip("\n").splitlines())
    row.start = row.end = event.time
    row.spans = [(event.time, event.time, "mark")]
    return row


def _moment(
    kind: str, seq: int, name: str, outcome: str, start: float, *, end: float | None = None, span: str = "mark"
) -> Row:
    """A row of one span: a mark at `start`, or a bar from `start` to `end`."""
    end = start if end is None else end
    return Row(kind, seq, name, outcome, start=start, end=end, spans=[(start, end, span)])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def duration(seconds: float) -> str:
    """``12ms``, ``4.2s``, ``3m10s``, ``2.1h``, ``3.0d``."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def render(run: RunInfo, events: list[AnyEvent], *, colour: bool = False, now: float | None = None) -> list[str]:
    """The timeline of `run` as lines of at most `WIDTH` visible characters."""
    now = time.time() if now is None else now
    glyphs = _FANCY if colour else _PLAIN
    paint = _Paint(colour)
    table = rows(events, now=now)
    t0 = events[0].time if events else run.created.timestamp()
    ends = [max(r.end, r.start) for r in table] + [e.time for e in events]
    t1 = max(ends, default=t0)
    if run.status in ("running", "paused", "pending"):
        t1 = max(t1, now)
    span = max(t1 - t0, 1e-3)

    title = paint("bold", f"run {run.run_id}") + f" · {run.workflow} · " + paint(_status_colour(run.status), run.status)
    facts = f"created {run.created:%Y-%m-%d %H:%M:%S} UTC · {duration(t1 - t0)} · {len(events)} events"
    out = [_fit(title, glyphs), _fit(facts + (f" · parent {run.parent}" if run.parent else ""), glyphs)]
    if run.forked_from or run.forks:
        origin = run.forked_from.rpartition("@") if run.forked_from else None
        links = [f"forked from {origin[0]} at seq {origin[2]}"] if origin else []
        links += [f"forks: {', '.join(run.forks)}"] if run.forks else []
        out.append(_fit(" · ".join(links), glyphs))
    if run.queue != "default" or run.due:  # the default queue goes without saying
        out.append(_fit(f"queue {run.queue}" + (f" · due {run.due:%Y-%m-%d %H:%M:%S} UTC" if run.due else ""), glyphs))
    if run.deadline:
        passed = " · passed: the run was cancelled" if run.timed_out else ""
        out.append(_fit(f"deadline {run.deadline:%Y-%m-%d %H:%M:%S} UTC{passed}", glyphs))
    if run.waiting_on:
        out.append(_fit(f"waiting: {run.waiting_on}", glyphs))
    if run.waiting:
        out.append(_fit(f"waiting for {describe([_log_form(w) for w in run.waiting])}", glyphs))
    left = f"{'seq':>{_SEQ}} {'step':<{_NAME}} {'outcome':<{_OUTCOME}} {'try':>{_TRIES}} {'time':>{_TIME}} "
    axis_end = duration(span)
    out.append(paint("dim", left + " " + "0".ljust(_BAR - len(axis_end)) + axis_end))
    for row in table:
        out.append(_row_line(row, t0, span, glyphs, paint))
        tone = "failed" if row.outcome in ("failed", "blocked", "retrying") else "dim"
        indent = " " * (_SEQ + 3)
        for note in row.notes:
            pieces = textwrap.wrap(note, WIDTH - len(indent)) or [""]
            out.extend(paint(tone, indent + piece) for piece in pieces)
    return out


def _row_line(row: Row, t0: float, span: float, glyphs: _Glyphs, paint: _Paint) -> str:
    seq = f"{row.seq:>{_SEQ}}" if row.seq is not None else " " * _SEQ
    name = _clip(row.name, _NAME, glyphs)
    if row.kind == "session":
        text = f"{seq} {paint('mark', '-- ' + row.name)}" + (f" ({row.outcome})" if row.outcome else "")
        return text
    tries = str(row.tries) if row.tries else ""
    took = duration(row.end - row.start) if row.kind in ("step", "pause", "sleep") else ""
    cells = [" "] * _BAR
    kinds: list[str | None] = [None] * _BAR
    for start, end, kind in row.spans:
        a = _column(start, t0, span)
        b = max(_column(end, t0, span), a)
        char = {"executed": glyphs.run, "failed": glyphs.fail, "paused": glyphs.gap, "sleep": glyphs.sleep}.get(
            kind, glyphs.tick
        )
        for i in range(a, b + 1):
            cells[i] = char
            kinds[i] = "replayed" if kind == "executed" and row.outcome == "replayed" else kind
    bar = "".join(paint(k, c) if k else c for c, k in zip(cells, kinds, strict=True))
    outcome = paint(_status_colour(row.outcome), f"{_clip(row.outcome, _OUTCOME, glyphs):<{_OUTCOME}}")
    return f"{seq} {name:<{_NAME}} {outcome} {tries:>{_TRIES}} {took:>{_TIME}} |{bar}|"


def _column(t: float, t0: float, span: float) -> int:
    return min(max(int((t - t0) / span * (_BAR - 1) + 0.5), 0), _BAR - 1)


def _clip(text: str, width: int, glyphs: _Glyphs) -> str:
    """`text` in `width` characters, keeping its end (a step ID's most telling part)."""
    return text if len(text) <= width else glyphs.more + text[-(width - len(glyphs.more)) :]


def _fit(text: str, glyphs: _Glyphs) -> str:
    visible = _visible(text)
    if len(visible) <= WIDTH:
        return text
    return visible[: WIDTH - len(glyphs.more)] + glyphs.more


def _visible(text: str) -> str:
    return _ANSI.sub("", text)


def _log_form(wait: Wait) -> Waiting:
    """A run's wait as its log records it, which `describe` words."""
    return Waiting(wait.kind, wait.token, wait.due.timestamp() if wait.due else None, wait.run)


def _status_colour(status: str) -> str:
    return {
        "completed": "executed",
        "cancelled": "dim",
        "blocked": "failed",
        "running": "retrying",
        "pending": "dim",
        "received": "mark",
    }.get(status, status)


class _Paint:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, kind: str, text: str) -> str:
        code = _COLOURS.get(kind) if self.colour else None
        return f"{code}{text}{_RESET}" if code else text
