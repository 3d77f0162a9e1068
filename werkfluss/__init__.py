"""werkfluss: durable workflows from plain coroutines, on Redis streams.

Wrap coroutines with `step()` and `workflow()`, call `start()`: every
step's input and output go into an event log, so a rerun after a crash,
a Ctrl-C or a deploy returns recorded results and executes only the steps
that did not complete.

This module only re-exports; the implementation lives in private modules,
from pure (``_errors``, ``_ids``, ``_options``, ``_events``, ``_context``)
to I/O (``_store``, ``_embedded``) to orchestration (``_runtime``,
``_wrappers``, ``_client``).
"""

from __future__ import annotations

from msgspec import Struct as _Struct

from ._client import start, start_async
from ._context import step_key
from ._errors import (
    ConfigurationError,
    NonDeterminismError,
    NotInWorkflowError,
    RunConflictError,
    RunFailedError,
    SerializationError,
    StepFailedError,
    StorageError,
    WerkflussError,
)
from ._options import RetryPolicy, Settings
from ._wrappers import Step, Workflow, step, workflow

__all__ = [
    "ConfigurationError",
    "NonDeterminismError",
    "NotInWorkflowError",
    "RetryPolicy",
    "RunConflictError",
    "RunFailedError",
    "SerializationError",
    "Settings",
    "Step",
    "StepFailedError",
    "StorageError",
    "WerkflussError",
    "Workflow",
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
