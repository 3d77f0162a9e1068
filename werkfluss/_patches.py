"""Patch markers: change a workflow's code under runs in flight.

``if patched("charge-v2"): <new code> else: <old code>`` lets runs that passed
that point on the old code replay it, while new runs (and runs that had not got
there yet) take the new branch. Once no run of the old branch is left, delete it
and write ``deprecate_patch("charge-v2")`` where the ``if`` was. The engine side
(the decision, the marker in the log) is `_engine._patches`.
"""

from __future__ import annotations

from ._context import RunContext, current_run
from ._errors import ConfigurationError, NotInWorkflowError

__all__ = ["deprecate_patch", "patched"]

_MAX_NAME = 100


def patched(name: str) -> bool:
    """Whether this run takes patch `name`'s new branch: ``if patched("charge-v2"): ... else: ...``.

    True for a new run, for a run that reaches this point for the first time
    (the marker is recorded in its log), and on every replay of a run that
    recorded the marker. False for a run that passed this point before the
    patch (its log has calls from here on and no marker): it keeps the old
    branch, and replays cleanly. A run's first answer for a name holds for the
    rest of it. Takes no sequence number, so the calls after it keep theirs.

    Raises:
        NotInWorkflowError: outside a workflow body (in a step, outside a run).
        ConfigurationError: `name` is not 1-100 printable characters.
    """
    run = _run("patched()", name)
    return run.runner.patched(name, run.upcoming())


def deprecate_patch(name: str) -> None:
    """Patch `name`'s old branch is deleted: write this where its ``if patched(name)`` was.

    Records nothing. Runs that recorded the marker replay as before (a marker
    no code reaches is not a divergence). A run still in flight that passed this
    point on the old branch diverges at the first call that differs, and its
    `NonDeterminismError` names the patch: it was deprecated too early.

    Raises:
        NotInWorkflowError: outside a workflow body (in a step, outside a run).
        ConfigurationError: `name` is not 1-100 printable characters.
    """
    run = _run("deprecate_patch()", name)
    run.runner.deprecate_patch(name, run.upcoming())


def _run(what: str, name: object) -> RunContext:
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or not name.isprintable():
        raise ConfigurationError(f"{what}: a patch name is 1-{_MAX_NAME} printable characters, got {name!r}")
    run = current_run()
    if run is None:
        raise NotInWorkflowError(f"{what} can only be used in a workflow body, not in a step or outside a run")
    return run
