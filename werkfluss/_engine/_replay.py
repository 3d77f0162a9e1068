"""What a run's log says, indexed for replay: a replayed call is a dict lookup.

Pure: whoever reads a log feeds its events to `Replay.add` (attaching to a
run reads it in batches, `_attach.read_replay`; a replay check is handed
the events), and the indexes are built once, so nothing on the step path
grows with the run's history.
"""

from __future__ import annotations

from .._events import (
    AnyEvent,
    HookReceived,
    PatchMarked,
    RaceWon,
    RunPaused,
    RunStarted,
    StepCompleted,
    StepFailed,
    TimerStarted,
    Waiting,
)

__all__ = ["Replay", "entry_key"]


def entry_key(entry: str) -> tuple[int, int]:
    """A stream entry ID (``"<ms>-<seq>"``) as a sortable pair."""
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


class Replay:
    """A run's recorded steps, hooks, timers and races, by sequence number.

    `labels` holds what each recorded seq was (a step or workflow ID,
    ``hook:<token>``, ``sleep``, ``race``), so a rerun that calls something
    else at that seq is caught instead of handed the wrong value.
    """

    __slots__ = (
        "attempts",
        "completed",
        "count",
        "cursors",
        "failed",
        "hooks",
        "labels",
        "patches",
        "paused",
        "races",
        "started",
        "timers",
        "waits",
    )

    def __init__(self) -> None:
        self.completed: dict[int, StepCompleted] = {}
        self.failed: dict[int, StepFailed] = {}
        self.labels: dict[int, str] = {}
        self.attempts: dict[int, int] = {}
        self.hooks: dict[tuple[int, int], HookReceived] = {}
        self.cursors: dict[str, str] = {}  # token -> last mailbox entry the run took
        self.timers: dict[int, float] = {}
        self.races: dict[int, int] = {}
        self.patches: dict[str, int] = {}  # patch name -> the seq its marker was recorded at
        self.waits: list[Waiting] = []  # what the run waited for in its pauses
        self.started: RunStarted | None = None
        self.paused = False  # the run paused before: it may have a timer entry
        self.count = 0

    def add(self, index: int, event: AnyEvent, retry_seq: int | None = None, retry_index: int = 0) -> None:
        """Index event number `index` (1-based) of the log.

        The final failure of `retry_seq` recorded up to `retry_index` is left
        out: that failure ended the run, and starting the run again means
        executing that step again.
        """
        self.count += 1
        if isinstance(event, StepCompleted):
            self.completed[event.seq] = event
            self.labels[event.seq] = event.step
            self.attempts[event.seq] = max(event.attempt, self.attempts.get(event.seq, 0))
        elif isinstance(event, StepFailed):
            self.labels[event.seq] = event.step
            self.attempts[event.seq] = max(event.attempt, self.attempts.get(event.seq, 0))
            if event.final and not (event.seq == retry_seq and index <= retry_index):
                self.failed[event.seq] = event
        elif isinstance(event, HookReceived):
            self.hooks[(event.seq, event.n)] = event
            self.labels[event.seq] = f"hook:{event.token}"
            last = self.cursors.get(event.token)
            if last is None or entry_key(event.entry) > entry_key(last):
                self.cursors[event.token] = event.entry
        elif isinstance(event, TimerStarted):
            self.timers[event.seq] = event.due
            self.labels[event.seq] = "sleep"
        elif isinstance(event, RaceWon):
            self.races[event.seq] = event.index
            self.labels[event.seq] = "race"
        elif isinstance(event, RunStarted):
            self.started = event
        elif isinstance(event, RunPaused):
            self.paused = True
            self.waits.extend(event.waits)
        elif isinstance(event, PatchMarked):
            self.patches.setdefault(event.name, event.seq)
