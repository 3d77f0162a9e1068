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
``_dead_letters``) beside the worker (``_worker`` and its helpers), and the
command line (``_cli/``). ``werkfluss.events`` names the log's events and
``werkfluss.testing`` holds helpers for users' test suites.
"""

from __future__ import annotations

from msgspec import Struct as _Struct

from . import events as events  # the module werkfluss.events: the log's event types
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
from ._errors import (
    ConfigurationError,
    HistoryTooLargeError,
    HookClosedError,
    HookConflictError,
    LossyServerWarning,
    NonDeterminismError,
    NotInWorkflowError,
    PayloadTooLargeError,
    RunCancelledError,
    RunConflictError,
    RunFailedError,
    RunNotFoundError,
    SerializationError,
    StepFailedError,
    StorageError,
    WerkflussError,
)
from ._options import RetryPolicy, Settings
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
from ._waits import Hook, hook, race, sleep
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
    "LossyServerWarning",
    "NonDeterminismError",
    "NotInWorkflowError",
    "PayloadTooLargeError",
    "PendingHook",
    "QueueDepth",
    "RetryPolicy",
    "RunCancelledError",
    "RunConflictError",
    "RunFailedError",
    "RunInfo",
    "RunNotFoundError",
    "RunPage",
    "RunSummary",
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
    "enqueue",
    "enqueue_async",
    "expire_hooks",
    "expire_hooks_async",
    "get_events",
    "get_events_async",
    "get_run",
    "get_run_async",
    "hook",
    "invoke_hook",
    "invoke_hook_async",
    "list_runs",
    "list_runs_async",
    "pending_hooks",
    "pending_hooks_async",
    "queue_depth",
    "queue_depth_async",
    "race",
    "redrive",
    "redrive_async",
    "resume",
    "resume_async",
    "sleep",
    "start",
    "start_async",
    "step",
    "step_key",
    "workflow",
]

# Show public names as werkfluss.X in reprs and tracebacks. msgspec Structs
# keep their module: msgspec resolves their annotations through it.
for _name in __all__:
    _obj = globals()[_name]
    if not (isinstance(_obj, type) and issubclass(_obj, _Struct)):
        _obj.__module__ = "werkfluss"
del _name, _obj
