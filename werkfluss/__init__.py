"""werkfluss: durable workflows from plain coroutines, on Redis streams.

Wrap coroutines with `step()` and `workflow()`, call `start()`: every
step's input and output go into an event log, so a rerun after a crash,
a Ctrl-C or a deploy returns recorded results and executes only the steps
that did not complete.

This module only re-exports; the implementation lives in private modules,
in layers that import only downwards: pure (``_errors``, ``_ids``,
``_options``, ``_events``, ``_values``, ``_logging``, ``_holder``), the run
context (``_context``), the store (``_store/``), the engine (``_engine/``),
the API (``_wrappers``, ``_waits``, ``_sync``, ``_client``, ``_queries``,
``_dead_letters``, ``_queue_info``, ``_schedule_info``, ``_fork``) beside the worker (``_worker/``), and
the command line (``_cli/``); ``tests/test_exports.py`` checks every import
against these layers. ``werkfluss.events`` names the log's events and
``werkfluss.testing`` holds helpers for users' test suites.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

# The errors are imported at once (they are light): their names show as
# werkfluss.X in a traceback even when nothing has touched werkfluss.X yet.
from ._errors import (
    ConfigurationError,
    HistoryTooLargeError,
    HookClosedError,
    HookConflictError,
    LossyServerWarning,
    NonDeterminismError,
    NotInWorkflowError,
    PayloadTooLargeError,
    QueueDeclarationWarning,
    RunCancelledError,
    RunConflictError,
    RunFailedError,
    RunNotFoundError,
    RunTimeoutError,
    SerializationError,
    StepFailedError,
    StorageError,
    WerkflussError,
)

if _typing.TYPE_CHECKING:
    from . import events as events
    from ._client import (
        PendingHook,
        cancel,
        cancel_async,
        enqueue,
        enqueue_async,
        expire_hooks,
        expire_hooks_async,
        invoke_hook,
        invoke_hook_async,
        pending_hooks,
        pending_hooks_async,
        resume,
        resume_async,
        start,
        start_async,
    )
    from ._context import step_key
    from ._dead_letters import (
        DeadLetter,
        QueueDepth,
        dead_letters,
        dead_letters_async,
        queue_depth,
        queue_depth_async,
        redrive,
        redrive_async,
    )
    from ._fork import fork_run, fork_run_async
    from ._options import RetryPolicy, Settings
    from ._patches import deprecate_patch, patched
    from ._queries import (
        ErrorRecord,
        RunInfo,
        RunPage,
        RunSummary,
        Wait,
        get_events,
        get_events_async,
        get_run,
        get_run_async,
        list_runs,
        list_runs_async,
    )
    from ._queue_info import KeyLoad, QueueInfo, list_queues, list_queues_async, queue_info, queue_info_async
    from ._queues import Queue
    from ._schedule_info import (
        ScheduleInfo,
        list_schedules,
        list_schedules_async,
        pause_schedule,
        pause_schedule_async,
        resume_schedule,
        resume_schedule_async,
        trigger_schedule,
        trigger_schedule_async,
    )
    from ._schedules import Schedule, schedule
    from ._waits import Hook, hook, race, sleep, sleep_until
    from ._worker import Worker
    from ._wrappers import Step, Workflow, step, workflow

__all__ = [
    "ConfigurationError",
    "DeadLetter",
    "ErrorRecord",
    "HistoryTooLargeError",
    "Hook",
    "HookClosedError",
    "HookConflictError",
    "KeyLoad",
    "LossyServerWarning",
    "NonDeterminismError",
    "NotInWorkflowError",
    "PayloadTooLargeError",
    "PendingHook",
    "Queue",
    "QueueDeclarationWarning",
    "QueueDepth",
    "QueueInfo",
    "RetryPolicy",
    "RunCancelledError",
    "RunConflictError",
    "RunFailedError",
    "RunInfo",
    "RunNotFoundError",
    "RunPage",
    "RunSummary",
    "RunTimeoutError",
    "Schedule",
    "ScheduleInfo",
    "SerializationError",
    "Settings",
    "Step",
    "StepFailedError",
    "StorageError",
    "Wait",
    "WerkflussError",
    "Worker",
    "Workflow",
    "cancel",
    "cancel_async",
    "dead_letters",
    "dead_letters_async",
    "deprecate_patch",
    "enqueue",
    "enqueue_async",
    "expire_hooks",
    "expire_hooks_async",
    "fork_run",
    "fork_run_async",
    "get_events",
    "get_events_async",
    "get_run",
    "get_run_async",
    "hook",
    "invoke_hook",
    "invoke_hook_async",
    "list_queues",
    "list_queues_async",
    "list_runs",
    "list_runs_async",
    "list_schedules",
    "list_schedules_async",
    "patched",
    "pause_schedule",
    "pause_schedule_async",
    "pending_hooks",
    "pending_hooks_async",
    "queue_depth",
    "queue_depth_async",
    "queue_info",
    "queue_info_async",
    "race",
    "redrive",
    "redrive_async",
    "resume",
    "resume_async",
    "resume_schedule",
    "resume_schedule_async",
    "schedule",
    "sleep",
    "sleep_until",
    "start",
    "start_async",
    "step",
    "step_key",
    "trigger_schedule",
    "trigger_schedule_async",
    "workflow",
]

# Where each public name is defined. Everything but the errors loads on first
# use (PEP 562), so `import werkfluss` -- which pytest does for the plugin in
# every run where werkfluss is installed -- does not import redis and anyio.
_DEFINED_IN = {
    **dict.fromkeys(
        (
            "DeadLetter",
            "QueueDepth",
            "dead_letters",
            "dead_letters_async",
            "queue_depth",
            "queue_depth_async",
            "redrive",
            "redrive_async",
        ),
        "_dead_letters",
    ),
    **dict.fromkeys(
        (
            "PendingHook",
            "cancel",
            "cancel_async",
            "enqueue",
            "enqueue_async",
            "expire_hooks",
            "expire_hooks_async",
            "invoke_hook",
            "invoke_hook_async",
            "pending_hooks",
            "pending_hooks_async",
            "resume",
            "resume_async",
            "start",
            "start_async",
        ),
        "_client",
    ),
    **dict.fromkeys(
        (
            "ErrorRecord",
            "RunInfo",
            "RunPage",
            "RunSummary",
            "Wait",
            "get_events",
            "get_events_async",
            "get_run",
            "get_run_async",
            "list_runs",
            "list_runs_async",
        ),
        "_queries",
    ),
    **dict.fromkeys(
        ("KeyLoad", "QueueInfo", "list_queues", "list_queues_async", "queue_info", "queue_info_async"), "_queue_info"
    ),
    **dict.fromkeys(("Hook", "hook", "race", "sleep", "sleep_until"), "_waits"),
    **dict.fromkeys(("deprecate_patch", "patched"), "_patches"),
    **dict.fromkeys(("Step", "Workflow", "step", "workflow"), "_wrappers"),
    "Queue": "_queues",
    **dict.fromkeys(("fork_run", "fork_run_async"), "_fork"),
    **dict.fromkeys(
        (
            "ScheduleInfo",
            "list_schedules",
            "list_schedules_async",
            "pause_schedule",
            "pause_schedule_async",
            "resume_schedule",
            "resume_schedule_async",
            "trigger_schedule",
            "trigger_schedule_async",
        ),
        "_schedule_info",
    ),
    **dict.fromkeys(("Schedule", "schedule"), "_schedules"),
    "RetryPolicy": "_options",
    "Settings": "_options",
    "Worker": "_worker",
    "step_key": "_context",
}


def _publish(names: list[str], module: _typing.Any) -> None:
    """Bind `names` of `module` here, shown as werkfluss.X in reprs and tracebacks.

    msgspec Structs keep their module: msgspec resolves their annotations through it.
    """
    import msgspec

    for name in names:
        obj = getattr(module, name)
        if not (isinstance(obj, type) and issubclass(obj, msgspec.Struct)):
            obj.__module__ = "werkfluss"
        globals()[name] = obj


def __getattr__(name: str) -> _typing.Any:
    if name == "events":
        return _importlib.import_module(".events", __name__)
    where = _DEFINED_IN.get(name)
    if where is None:
        raise AttributeError(f"module 'werkfluss' has no attribute {name!r}")
    module = _importlib.import_module(f".{where}", __name__)
    # All of the module's public names at once: a Step made by step() is then werkfluss.Step too.
    _publish([n for n, w in _DEFINED_IN.items() if w == where], module)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "events"})


_publish([n for n in __all__ if n.endswith(("Error", "Warning"))], _importlib.import_module("._errors", __name__))
