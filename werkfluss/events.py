"""The events of a run's log, as `get_events` returns them.

Each is a frozen msgspec Struct with the writer's Unix `time` in seconds.
Argument, result and payload fields are `msgspec.Raw` msgpack; read them
with ``msgspec.msgpack.decode(event.result)`` (plain values) or
``msgspec.msgpack.decode(event.result, type=MyType)``::

    for event in werkfluss.get_events("order-7"):
        if isinstance(event, werkfluss.events.StepFailed):
            print(event.seq, event.step, event.attempt, event.error.message)
"""

from __future__ import annotations

from ._events import (
    AnyEvent,
    ErrorInfo,
    Event,
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
)

__all__ = [
    "AnyEvent",
    "ErrorInfo",
    "Event",
    "HookReceived",
    "PatchMarked",
    "RaceWon",
    "RunBlocked",
    "RunCancelled",
    "RunCompleted",
    "RunFailed",
    "RunPaused",
    "RunResumed",
    "RunStarted",
    "StepCompleted",
    "StepFailed",
    "TimerStarted",
    "Waiting",
]
