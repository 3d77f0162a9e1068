"""Stable identities: workflow and step IDs, run IDs, hook tokens, and the one
registry of what this process defines.

IDs must be the same on every machine and checkout, so they come from the
import name of the defining module plus the qualified name, never from a
file path. A script run as ``python example.py`` has ``__module__ ==
"__main__"``; it is mapped to the name a worker would import (``example``)
so that the script and a worker agree.

The registry maps each ID to the function that claimed it, which keeps two
definitions from sharing an ID, and to the workflow itself, which is what a
worker can run.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

# Run IDs become Redis hash tags ({run_id}); braces would break the tag and
# whitespace/control characters make keys impossible to type in a shell.
_RUN_ID = re.compile(r"[^\s{}\x00-\x1f\x7f]{1,200}")


class _Definition(NamedTuple):
    kind: str  # "step" or "workflow"
    location: tuple[str, int]  # the defining function's file and first line
    # The `Workflow` itself for a workflow (typed Any: this module sits below the
    # layers that know the type), None for a step.
    workflow: Any


# Every step and workflow defined in this process, by ID.
_registry: dict[str, _Definition] = {}


def module_name(module: str) -> str:
    """The import name of `module`, with ``__main__`` mapped to what a worker imports."""
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)  # python -m package.module
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else "__main__"


def callable_id(fn: Callable[..., Any], name: str | None = None) -> str:
    """The ID of a workflow or step: ``module:qualname`` unless `name` overrides it.

    Lambdas and functions defined inside other functions add their first
    line (``tests.flows:make.<locals>.inner@12``): their qualified names
    alone are not unique in a module.
    """
    if name is not None:
        if not name or any(c in "{}" or c.isspace() or not c.isprintable() for c in name):
            raise ConfigurationError(f"invalid name {name!r}: it must be non-empty, without braces or whitespace")
        return name
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not qualname:
        raise ConfigurationError(f"cannot derive an ID for {fn!r}: pass name='...'")
    ident = f"{module_name(getattr(fn, '__module__', None) or '__main__')}:{qualname}"
    if "<lambda>" in qualname or "<locals>" in qualname:
        code = getattr(fn, "__code__", None)
        if code is not None:
            ident += f"@{code.co_firstlineno}"
    return ident


def _location(fn: Callable[..., Any]) -> tuple[str, int]:
    code = getattr(fn, "__code__", None)
    if code is None:
        return (repr(fn), 0)
    # realpath: `python ./app.py` and a later `import app` name one file two ways.
    return (os.path.realpath(code.co_filename), code.co_firstlineno)


def register(ident: str, kind: str, fn: Callable[..., Any], workflow: Any = None) -> None:
    """Claim `ident` for `fn` (and, for a workflow, make `workflow` what a worker runs
    under it), or raise if another function already holds it.

    Defining the same function again (a module imported twice, once as
    ``__main__`` and once by name, or reloaded) is not a conflict: it has
    the same source location, and the latest definition is the one kept.
    """
    location = _location(fn)
    held = _registry.get(ident)
    if held is not None and (held.kind, held.location) != (kind, location):
        file, line = held.location
        raise ConfigurationError(
            f"{kind} ID {ident!r} is already taken by a {held.kind} defined at {file}:{line}; "
            f"give one of them another name with name='...'"
        )
    _registry[ident] = _Definition(kind, location, workflow)


def registered_workflow(workflow_id: str) -> Any:
    """The workflow (a `Workflow`) defined in this process under `workflow_id`, or None."""
    held = _registry.get(workflow_id)
    return held.workflow if held is not None and held.kind == "workflow" else None


def registered_workflows() -> list[str]:
    """The IDs of every workflow defined in this process, sorted."""
    return sorted(ident for ident, held in _registry.items() if held.kind == "workflow")


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it can name a run, else raise `ConfigurationError`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigurationError(f"invalid run_id {run_id!r}: use 1 to 200 characters without whitespace or braces")
    return run_id


def check_token(token: str) -> str:
    """Return `token` if it can name a hook, else raise `ConfigurationError`.

    A token is a key's hash tag like a run ID, so it follows the run ID's rule.
    """
    try:
        return check_run_id(token)
    except ConfigurationError:
        raise ConfigurationError(
            f"invalid hook token {token!r}: use 1 to 200 characters without whitespace or braces"
        ) from None


def derive_run_id(workflow_id: str, encoded_args: bytes) -> str:
    """The run ID for `workflow_id` started with these (deterministically encoded) arguments.

    Running the same script twice reaches the same run: that is what makes
    a rerun resume instead of starting afresh.
    """
    digest = hashlib.sha256(workflow_id.encode() + b"\0" + encoded_args).hexdigest()[:24]
    short = workflow_id.rsplit(":", 1)[-1].replace("{", "").replace("}", "")
    return check_run_id(f"{short[:60]}-{digest}")


def child_run_id(parent: str, seq: int) -> str:
    """The run ID of the child workflow a parent run calls at `seq`: ``<parent>/<seq>``.

    Deterministic, so a rerun of the parent reaches the same child instead
    of starting it twice. Deep nesting keeps it within 200 characters by
    hashing the parent's part.
    """
    ident = f"{parent}/{seq}"
    if len(ident) > 200:
        digest = hashlib.sha256(parent.encode()).hexdigest()[:24]
        ident = f"{parent[:120]}~{digest}/{seq}"
    return check_run_id(ident)
