"""The werkfluss exception tree.

Every error a user can catch derives from `WerkflussError`::

    WerkflussError
    ├── ConfigurationError      bad settings, IDs or options, found at definition time
    ├── SerializationError      a value msgspec cannot encode (names step + argument)
    │   └── PayloadTooLargeError    an encoded value over `Settings.max_payload`
    ├── StorageError            Redis/Valkey unreachable or answering nonsense
    ├── HistoryTooLargeError    a run's log reached `Settings.max_history` events
    ├── NonDeterminismError     replay found another step than the log recorded
    ├── StepFailedError         a step exhausted its retries (carries the original error)
    ├── RunFailedError          a run this caller waited for ended in failure
    ├── RunConflictError        a run ID already belongs to another workflow or arguments
    ├── RunNotFoundError        no run has this ID (queries, cancel, resume)
    ├── RunCancelledError       the run was cancelled (by `cancel()` or the CLI)
    │   └── RunTimeoutError         the run was cancelled because its deadline passed
    ├── HookConflictError       a hook token already belongs to another run
    ├── HookClosedError         a payload for a hook whose run completed or was cancelled
    └── NotInWorkflowError      a run-only function was called outside a run or step

One warning category goes with them: `LossyServerWarning`, for a server that
could silently lose runs (an eviction policy, no persistence).

`_Suspend` is deliberately *not* in that tree: it is a private `BaseException`
used to unwind a run whose lease was lost, so that a user's
`except Exception:` can never swallow it.
"""

from __future__ import annotations

from typing import final

__all__ = [
    "ConfigurationError",
    "HistoryTooLargeError",
    "HookClosedError",
    "HookConflictError",
    "LossyServerWarning",
    "NonDeterminismError",
    "NotInWorkflowError",
    "PayloadTooLargeError",
    "QueueDeclarationWarning",
    "RunCancelledError",
    "RunConflictError",
    "RunFailedError",
    "RunNotFoundError",
    "RunTimeoutError",
    "SerializationError",
    "StepFailedError",
    "StorageError",
    "WerkflussError",
]


class WerkflussError(Exception):
    """Root of every error werkfluss raises on purpose."""


class ConfigurationError(WerkflussError):
    """Settings, IDs or options are invalid; raised where they are defined."""


class SerializationError(WerkflussError):
    """A value cannot be encoded to (or decoded from) the event log.

    Attributes:
        step_id: The step (or workflow) whose argument or result is at fault.
        where: Which value: ``"argument 'user'"``, ``"result"``, with a path
            into the value where one is known (``"argument 'order'.items[2]"``).
    """

    def __init__(self, message: str, *, step_id: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.step_id = step_id
        self.where = where


class PayloadTooLargeError(SerializationError):
    """An encoded value is larger than `Settings.max_payload`; nothing was written.

    Attributes:
        size: The value's encoded size in bytes.
        limit: The limit it exceeds.
    """

    def __init__(self, message: str, *, step_id: str, where: str, size: int, limit: int) -> None:
        super().__init__(message, step_id=step_id, where=where)
        self.size = size
        self.limit = limit


class HistoryTooLargeError(WerkflussError):
    """A run's log reached `Settings.max_history` events; the run fails with this.

    Raise the cap (or split the work into child runs) and resume the run.
    """

    def __init__(self, run_id: str, events: int, limit: int) -> None:
        super().__init__(
            f"run {run_id!r} has {events} events in its log, the limit is {limit} (Settings.max_history): "
            f"split the work into child workflows, or raise the limit and resume the run"
        )
        self.run_id = run_id
        self.events = events
        self.limit = limit


class StorageError(WerkflussError):
    """The Redis/Valkey server is unreachable, misconfigured or refused a command."""


class NonDeterminismError(WerkflussError):
    """A rerun called another step at a sequence number than the log recorded.

    The run is parked as ``blocked``; nothing past the divergence executes.
    Deploy code that calls the recorded steps in the recorded order and start
    the run again.
    """

    def __init__(
        self, run_id: str, seq: int, recorded: str, called: str, *, arguments: str | None = None, hint: str = ""
    ) -> None:
        if arguments is None:
            message = (
                f"run {run_id!r}: step #{seq} was recorded as {recorded!r} but the workflow now "
                f"calls {called!r}. The workflow code changed under a run in progress; restore the "
                f"old order of steps (new steps may only be appended after the recorded ones) and "
                f"start the run again."
            )
        else:
            message = (
                f"run {run_id!r}: step #{seq} {called!r} is called with other arguments than recorded: "
                f"{arguments}. The workflow computed them differently on this replay (a clock, a random "
                f"value, the environment, changed code); make them depend only on the workflow's arguments "
                f"and earlier steps' results, or declare the step @step(check_args=False) if it "
                f"legitimately takes a changing value."
            )
        if hint:  # what else is known about the change, e.g. a patch deprecated too early
            message = f"{message} {hint}"
        super().__init__(message)
        self.run_id = run_id
        self.seq = seq
        self.recorded = recorded
        self.called = called
        self.arguments = arguments
        self.hint = hint


class StepFailedError(WerkflussError):
    """A step failed on its last allowed attempt.

    The original exception is kept as data (type name, message, traceback
    text), never re-imported by name. ``original`` holds the exception object
    itself when this process raised it, or when it is a builtin exception that
    can be rebuilt from its message; otherwise it is ``None``.
    """

    def __init__(
        self,
        *,
        run_id: str,
        step_id: str,
        seq: int,
        attempts: int,
        error_type: str,
        error_message: str,
        traceback: str,
        original: BaseException | None = None,
    ) -> None:
        plural = "attempt" if attempts == 1 else "attempts"
        super().__init__(
            f"step {step_id!r} (#{seq} of run {run_id!r}) failed after {attempts} {plural}: "
            f"{error_type}: {error_message}"
        )
        self.run_id = run_id
        self.step_id = step_id
        self.seq = seq
        self.attempts = attempts
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback
        self.original = original


class RunFailedError(WerkflussError):
    """A run that this caller attached to ended in failure in another process."""

    def __init__(self, run_id: str, error_type: str, error_message: str, traceback: str = "") -> None:
        super().__init__(f"run {run_id!r} failed: {error_type}: {error_message}")
        self.run_id = run_id
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback


class RunConflictError(WerkflussError):
    """A run ID is taken by a run of another workflow, or with other arguments, or
    the run is in no state for what was asked (resuming a completed run)."""

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class RunNotFoundError(WerkflussError, LookupError):
    """No run has the ID asked for (`get_run`, `cancel`, `resume`, the CLI)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"there is no run {run_id!r}")
        self.run_id = run_id


class RunCancelledError(WerkflussError):
    """The run was cancelled; starting it again does not execute it afresh."""

    def __init__(self, run_id: str, reason: str = "") -> None:
        super().__init__(f"run {run_id!r} was cancelled" + (f": {reason}" if reason else ""))
        self.run_id = run_id
        self.reason = reason


class RunTimeoutError(RunCancelledError):
    """The run was cancelled because its deadline passed (``@workflow(deadline=...)``
    or ``options(deadline=...)``); `reason` says which deadline and when.

    A subclass of `RunCancelledError`: a run past its deadline is a cancelled run,
    and starting it again raises this again instead of executing it.
    """


class HookConflictError(WerkflussError):
    """A run awaited a hook whose token another run already waits on.

    A token names one mailbox for one run: pick tokens that include
    something unique to the run (an order ID), or use ``hook()``'s default.
    """

    def __init__(self, token: str, run_id: str, owner: str) -> None:
        super().__init__(
            f"run {run_id!r} awaits hook {token!r}, but that token belongs to run {owner!r}; "
            f"use a token unique to the run"
        )
        self.token = token
        self.run_id = run_id
        self.owner = owner


class HookClosedError(WerkflussError):
    """A payload was sent to a hook whose run has completed or been cancelled.

    Nothing is stored: no run would ever take it.
    """

    def __init__(self, token: str, run_id: str, status: str) -> None:
        super().__init__(f"hook {token!r} belongs to run {run_id!r}, which is {status}: no run will take the payload")
        self.token = token
        self.run_id = run_id
        self.status = status


class NotInWorkflowError(WerkflussError):
    """A function that needs a running workflow or step was called outside one."""


class LossyServerWarning(UserWarning):
    """The Redis/Valkey server could silently lose runs: an eviction policy
    other than ``noeviction``, or persistence switched off.

    Issued through Python's `warnings` when the application has not configured
    logging (otherwise the ``werkfluss`` logger reports it), so that it reaches
    stderr either way. Silence it with
    ``-W ignore::werkfluss.LossyServerWarning``.
    """


class QueueDeclarationWarning(UserWarning):
    """Another process declares a queue with other limits, which stay in force for now.

    Issued through Python's `warnings` when the application has not configured
    logging (otherwise the ``werkfluss`` logger reports it as an error), like
    `LossyServerWarning`: a deploy whose new limits do nothing yet must not pass
    unseen.
    """


@final
class _Suspend(BaseException):
    """Unwinds a run this process may no longer write (its lease was taken over).

    A `BaseException` so that user code's ``except Exception`` cannot swallow it.
    """

    def __init__(self, run_id: str, reason: str) -> None:
        super().__init__(f"run {run_id!r}: {reason}")
        self.run_id = run_id
        self.reason = reason
