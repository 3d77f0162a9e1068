"""The ``werkfluss`` logger, and the structured fields its run and step records carry.

Levels: a run starting, resuming, pausing, completing or being cancelled,
and a step retrying, are INFO; a run failing or blocked on a code change,
a step failing for good, and connection trouble are WARNING; each step
executed or replayed is DEBUG. Step arguments, results and hook payloads
are never logged, at any level: they may hold secrets.

Every record of a run or step carries ``werkfluss_event`` (``run.started``,
``run.resumed``, ``run.paused``, ``run.completed``, ``run.failed``,
``run.blocked``, ``run.cancelled``, ``run.interrupted`` (the server was out of reach),
``run.history`` (its log grew past
``Settings.history_warning``), ``step.executed``, ``step.replayed``,
``step.retrying``, ``step.failed``, ``hook.received``, ``hook.rejected``), ``werkfluss_run``,
and for steps ``werkfluss_seq`` and ``werkfluss_step``, so a handler can
show progress or ship structured logs without parsing messages.

Nothing is printed unless the application configures logging (for example
``logging.basicConfig(level=logging.INFO)``); ``werkfluss worker`` does.
"""

from __future__ import annotations

import logging

__all__ = ["log", "note"]

log = logging.getLogger("werkfluss")
# A library configures no output: records go where the application's logging
# sends them, and nowhere (not to stderr via logging.lastResort) without any.
log.addHandler(logging.NullHandler())


def note(
    level: int, event: str, run_id: str, message: str, *args: object, seq: int | None = None, step: str | None = None
) -> None:
    """Log `message` % `args` at `level`, with the structured fields of `event`."""
    if log.isEnabledFor(level):
        fields = {"werkfluss_event": event, "werkfluss_run": run_id, "werkfluss_seq": seq, "werkfluss_step": step}
        log.log(level, message, *args, extra=fields, stacklevel=2)
