"""R-27: a step called with a socket, a lambda, an open file, or a value with a reference
cycle, in a worker process. The `SerializationError` must name the step and the path to
the argument, and come before the step's side effect (its effect sink stays empty) and
before anything is recorded for the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from werkfluss._events import RunFailed, StepCompleted, StepFailed

from . import flows
from .harness import report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# kind -> the argument path the error must name
BAD = {
    "socket": "argument 0",
    "lambda": "argument 0['callback']",
    "file": "argument 0[1]",
    "cycle": "argument 0['nested']['cycle']",
}


def test_r27_unstorable_arguments_fail_before_the_step_runs_naming_step_and_path(faults: Faults) -> None:
    runs = {f"unstorable-{kind}": (kind,) for kind in BAD}
    faults.workers.start()
    faults.enqueue(flows.unstorable, runs.items())
    faults.wait_status(runs, ["failed"])
    figures = faults.check(dict.fromkeys(runs), statuses=["failed"])
    side_effects = sorted(p.name for p in (faults.root / "effects").iterdir())
    assert side_effects == [], "a step ran with an argument that could not be stored"
    messages = {}
    for run_id, (kind,) in runs.items():
        events = [e for _, e in faults.events(run_id)]
        assert not [e for e in events if isinstance(e, StepCompleted | StepFailed)], "nothing recorded for the step"
        assert isinstance(events[-1], RunFailed) and events[-1].error.type.endswith("SerializationError")
        messages[kind] = events[-1].error.message
        assert "faults:store-this" in messages[kind] and BAD[kind] in messages[kind], messages[kind]
    report(
        f"R-27 unstorable arguments [{faults.kind}]",
        **figures,
        side_effects=len(side_effects),
        message_names_step_and_argument=dict.fromkeys(messages, "yes"),
        messages={kind: message[:160] for kind, message in messages.items()},
    )
