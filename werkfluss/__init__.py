"""werkfluss: durable workflows from plain coroutines, on Redis streams.

Wrap coroutines with `step()` and `workflow()`, call `start()`: every
step's input and output go into an event log, so a rerun after a crash,
a Ctrl-C or a deploy returns recorded results and executes only the steps
that did not complete.

This module only re-exports; the implementation lives in private modules,
from pure (``_errors``, ``_ids``, ``_options``, ``_events``, ``_context``)
to I/O (``_store``, ``_scripts``, ``_embedded``) to orchestration
(``_replay``, ``_executor``, ``_runtime``, ``_waits``, ``_wrappers``,
``_client``, ``_worker``).
"""

from __future__ import annotations

from msgspec import Struct as _Struct

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
    start,
    start_async,
)
from ._context import step_key
from ._errors import (
    ConfigurationError,
    HookConflictError,
    NonDeterminismError,
    NotInWorkflowError,
    RunCancelledError,
    RunConflictError,
    RunFailedError,
    SerializationError,
    StepFailedError,
    StorageError,
    WerkflussError,
)
from ._options import RetryPolicy, Settings
from ._waits import Hook, hook, race, sleep
from ._worker import Worker
from ._wrappers import Step, Workflow, step, workflow

__all__ = [
    "ConfigurationError",
    "Hook",
    "HookConflictError",
    "NonDeterminismError",
    "NotInWorkflowError",
    "PendingHook",
    "RetryPolicy",
    "RunCancelledError",
    "RunConflictError",
    "RunFailedError",
    "SerializationError",
    "Settings",
    "Step",
    "StepFailedError",
    "StorageError",
    "WerkflussError",
    "Worker",
    "Workflow",
    "cancel",
    "cancel_async",
    "enqueue",
    "enqueue_async",
    "expire_hooks",
    "expire_hooks_async",
    "hook",
    "invoke_hook",
    "invoke_hook_async",
    "pending_hooks",
    "pending_hooks_async",
    "race",
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
