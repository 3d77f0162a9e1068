"""The event log's vocabulary: the events, their codec, and how a run's state
names what it waits for and why it failed.

Events are frozen msgspec Structs in a tagged union, encoded as msgpack
arrays (compact, and new fields may be appended with defaults: see msgspec's
schema-evolution rules, the law for anything persisted here). One Encoder
and one Decoder are built once. User values inside events (arguments,
results, payloads) are raw msgpack, encoded by `_values`. Nothing here ever
imports a name read from the log: error types are kept as strings.

`ErrorInfo` and `Waiting` are the log's forms of an error and of a wait; the
queries turn them into `ErrorRecord` and `Wait` (UTC datetimes) for readers.
"""

from __future__ import annotations

import builtins
import time
import traceback as tb
from typing import Literal, TypeAlias

import msgspec

RunStatus: TypeAlias = Literal["pending", "running", "paused", "completed", "failed", "blocked", "cancelled"]
"""Where a run stands: waiting for a worker, executing, waiting for a hook, timer or child,
or ended (completed, failed, blocked on a divergence, cancelled)."""

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
    "RunStatus",
    "StepCompleted",
    "StepFailed",
    "TimerStarted",
    "Waiting",
    "decode_event",
    "decode_waits",
    "describe",
    "encode_event",
    "error_info",
]


class ErrorInfo(msgspec.Struct, frozen=True, array_like=True):
    """An exception as data: its type name, message and traceback text.

    The log's form, inside `StepFailed`, `RunFailed` and `RunBlocked`;
    `get_run` reads a run's error as the equal `werkfluss.ErrorRecord`.
    """

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """Capture `exc` (type, ``str()``, formatted traceback) as data."""
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        text = "".join(tb.format_exception(exc))
        try:
            message = str(exc)
        except Exception:  # a broken __str__ must not lose the failure itself
            message = f"<{name} whose str() failed>"
        return cls(type=name, message=message, traceback=text)

    def rebuild(self) -> BaseException | None:
        """The exception object, for builtin exception types only.

        Rebuilding is limited to classes of the `builtins` module: looking
        up any other name read from the log could import or run code.
        """
        cls = getattr(builtins, self.type, None) if "." not in self.type else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(self.message)
            except Exception:
                return None
        return None


class Event(msgspec.Struct, frozen=True, array_like=True, tag_field="k"):
    """Base of every logged event; `time` is the writer's Unix time in seconds."""

    time: float


class RunStarted(Event, tag="run-started", frozen=True, array_like=True):
    """The run was created; `args` is the encoded ``[args, kwargs]`` of the workflow,
    `parent` the run that started it as a child, if one did."""

    workflow: str
    args: msgspec.Raw
    parent: str | None = None


class RunResumed(Event, tag="run-resumed", frozen=True, array_like=True):
    """A process took the run over (after a crash, a failure or a pause)."""

    holder: str


class StepCompleted(Event, tag="step-completed", frozen=True, array_like=True):
    """Step `seq` returned. Written with its start time, in one round trip.

    `args` is the call's ``[args, kwargs]`` as given; `digest` is `call_digest`
    of them, which a replay compares (None: recorded before digests, or the
    step opted out with ``check_args=False``).
    """

    seq: int
    step: str
    attempt: int
    started: float
    args: msgspec.Raw
    result: msgspec.Raw
    digest: bytes | None = None


class StepFailed(Event, tag="step-failed", frozen=True, array_like=True):
    """An attempt of step `seq` failed; `final` when no retry follows."""

    seq: int
    step: str
    attempt: int
    started: float
    error: ErrorInfo
    final: bool
    retry_at: float | None = None
    digest: bytes | None = None  # of the call's arguments, as in `StepCompleted`


class Waiting(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """One thing a paused run waits for: a hook's token, a timer's due time, a child run.

    The log's form, inside `RunPaused` (`due` in Unix seconds); the queries
    read a run's waits as `werkfluss.Wait` (`due` a UTC datetime).
    """

    kind: str  # "hook", "timer" or "child"
    token: str | None = None
    due: float | None = None
    run: str | None = None


class RunPaused(Event, tag="run-paused", frozen=True, array_like=True):
    """The run parked: no process holds it until one of `waits` happens."""

    waits: list[Waiting]


class TimerStarted(Event, tag="timer-started", frozen=True, array_like=True):
    """``sleep()`` number `seq` is due at Unix time `due`, however often the run replays."""

    seq: int
    due: float


class HookReceived(Event, tag="hook-received", frozen=True, array_like=True):
    """Payload number `n` of hook `seq` (`token`), taken from its mailbox entry `entry`."""

    seq: int
    token: str
    n: int
    entry: str
    payload: msgspec.Raw


class RaceWon(Event, tag="race-won", frozen=True, array_like=True):
    """``race()`` number `seq` was won by its awaitable number `index`."""

    seq: int
    index: int


class PatchMarked(Event, tag="patch-marked", frozen=True, array_like=True):
    """``patched(name)`` first returned True here, with `seq` the next call's sequence number.

    Takes no sequence number of its own: the calls after it are numbered as in
    a run recorded before the patch, so such a run still replays (`_engine._patches`).
    """

    name: str
    seq: int


class RunCancelled(Event, tag="run-cancelled", frozen=True, array_like=True):
    """The run was cancelled, with the canceller's `reason`."""

    reason: str


class RunCompleted(Event, tag="run-completed", frozen=True, array_like=True):
    """The workflow returned `result`."""

    result: msgspec.Raw


class RunFailed(Event, tag="run-failed", frozen=True, array_like=True):
    """The workflow raised; `seq` names the failed step that caused it, if one did."""

    error: ErrorInfo
    seq: int | None = None


class RunBlocked(Event, tag="run-blocked", frozen=True, array_like=True):
    """Replay diverged from the log (`error` says where); the run waits for fixed code."""

    error: ErrorInfo


AnyEvent: TypeAlias = (
    RunStarted
    | RunResumed
    | StepCompleted
    | StepFailed
    | RunPaused
    | TimerStarted
    | HookReceived
    | RaceWon
    | PatchMarked
    | RunCompleted
    | RunFailed
    | RunBlocked
    | RunCancelled
)

_event_encoder = msgspec.msgpack.Encoder()
_event_decoder: msgspec.msgpack.Decoder[AnyEvent] = msgspec.msgpack.Decoder(AnyEvent)


def encode_event(event: AnyEvent) -> bytes:
    """Encode one event for the log."""
    return _event_encoder.encode(event)


def decode_event(data: bytes) -> AnyEvent:
    """Decode one log entry.

    Raises:
        msgspec.DecodeError: for anything malformed: bad msgpack, a wrong
            shape, invalid UTF-8, absurdly deep nesting.
    """
    try:
        return _event_decoder.decode(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        if isinstance(exc, msgspec.DecodeError):
            raise
        raise msgspec.DecodeError(f"malformed event: {type(exc).__name__}: {exc}") from None


def error_info(raw: bytes) -> ErrorInfo:
    """A run's recorded error (its state's ``error`` field), tolerating garbage."""
    try:
        return msgspec.msgpack.decode(raw, type=ErrorInfo)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return ErrorInfo(type="werkfluss.UnknownError", message="the recorded error could not be decoded")


def decode_waits(raw: bytes) -> list[Waiting] | None:
    """What a paused run waits for (its state's ``waiting`` field); None when it does not decode."""
    try:
        return msgspec.msgpack.decode(raw, type=list[Waiting])
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None


def describe(waits: list[Waiting]) -> str:
    """``hook 'approve:7' or timer at 2026-11-21 12:00:00 UTC``, for logs, errors and the timeline."""
    parts = []
    for wait in waits:
        if wait.kind == "hook":
            parts.append(f"hook {wait.token!r}")
        elif wait.kind == "timer":
            due = wait.due
            parts.append(
                "a timer" if due is None else time.strftime("timer at %Y-%m-%d %H:%M:%S UTC", time.gmtime(due))
            )
        else:
            parts.append(f"child run {wait.run!r}")
    return " or ".join(parts) or "nothing"
