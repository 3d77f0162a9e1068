"""R-28: steps whose result or exception cannot be stored, in a worker process.

- a step returns a generator, another a dict holding a lock (`more_flows.gives_generator`,
  `gives_object`): the result cannot be encoded, so the attempt is a final `StepFailed`
  (retrying would return the same value), never a hang or a retry loop;
- a step raises `exotic.NeedyError`, whose constructor takes two required arguments and
  which carries a lock and a lambda (pickle refuses both): it is recorded as data, type
  name, message and traceback text, attempt after attempt per its retry policy.

Run uncaught (`more_flows.bad_result`), each fails its run clearly. Caught
(`more_flows.keeps_failures`, paused on a hook afterwards), the failures are replayed by a
fresh process that resumes the run: it gets `StepFailedError`s with the recorded type
names, rebuilds no object of a non-builtin type, and imports no module the log names
(`sys.modules` before and after, in that process).
"""

from __future__ import annotations

import json
import signal
from typing import TYPE_CHECKING

import pytest

from werkfluss._events import RunFailed, RunResumed, RunStarted, StepCompleted, StepFailed

from . import more_flows
from .harness import pct, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ATTEMPTS = more_flows.QUICK_RETRIES.retries + 1
NEEDY = "tests.faults.exotic.NeedyError"

# The replaying process: resumes the paused run, reports what it saw and what it imported.
REPLAY = """
import json, sys
from werkfluss import start
from tests.faults import more_flows
before = set(sys.modules)
result = start(more_flows.keeps_failures.options(run_id=sys.argv[1]), int(sys.argv[2]))
print(json.dumps({"result": result, "imported": sorted(set(sys.modules) - before)}))
"""


def test_r28_unstorable_results_and_exceptions_fail_the_run_clearly(faults: Faults) -> None:
    faults.workers.module = "tests.faults.more_flows"
    worker = faults.workers.start()
    runs = {f"bad-{kind}": (kind,) for kind in more_flows.BAD_RESULTS}
    faults.enqueue(more_flows.bad_result, runs.items())
    faults.wait_status(runs, ["failed"])
    seconds_to_failed, messages = {}, {}
    for run_id, (kind,) in runs.items():
        events = [e for _, e in faults.events(run_id)]
        failures = [e for e in events if isinstance(e, StepFailed)]
        assert not any(isinstance(e, StepCompleted) for e in events)
        for failure in failures:
            info = failure.error
            assert all(isinstance(v, str) and v for v in (info.type, info.message, info.traceback)), info
        assert [f.final for f in failures][-1] is True
        if kind == "exception":
            assert [f.attempt for f in failures] == list(range(1, ATTEMPTS + 1)), "retried as its policy says"
            assert failures[-1].error.type == NEEDY and "code 3: the gateway refused" in failures[-1].error.message
        else:
            assert len(failures) == 1 and failures[0].attempt == 1, "an unfit result is final at once"
            assert failures[0].error.type.endswith("SerializationError"), failures[0].error
            assert "faults:gives-" in failures[0].error.message
        ended = events[-1]
        assert isinstance(ended, RunFailed) and ended.error.type.endswith("StepFailedError"), ended
        started = next(e.time for e in events if isinstance(e, RunStarted))
        seconds_to_failed[kind] = round(ended.time - started, 3)
        messages[kind] = ended.error.message[:200]
    rows = [r.key for r in faults.ledger("exec")]
    executions = {kind: rows.count(f"{run_id}:1") for run_id, (kind,) in runs.items()}
    assert executions == {"generator": 1, "object": 1, "exception": ATTEMPTS}, executions

    # Caught, then replayed by another process.
    faults.enqueue(more_flows.keeps_failures, [("keeper", (7,))])
    faults.wait_status(["keeper"], ["paused"])
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    recorded = {e.seq: e.error.type for _, e in faults.events("keeper") if isinstance(e, StepFailed) and e.final}
    faults.invoke_hook(more_flows.keep_token(7), "go")
    replayer = faults.python(REPLAY, "keeper", "7")
    out, err = replayer.communicate(timeout=60)
    assert replayer.returncode == 0, err
    replayed = json.loads(out)
    seen = {kind: (error_type, attempts, original) for kind, error_type, _, attempts, original in replayed["result"]}
    assert [t for t, _, _ in seen.values()] == [recorded[seq] for seq in sorted(recorded)], (seen, recorded)
    assert seen["exception"] == (NEEDY, ATTEMPTS, None), "the type name, and no object of a class from the log"
    named = {t.rpartition(".")[0] for t in recorded.values()}
    imported_named = [m for m in replayed["imported"] if m in named]
    assert "tests.faults.exotic" not in replayed["imported"] and imported_named == [], replayed["imported"]
    assert [r for r in faults.ledger("exec") if r.pid == replayer.pid] == [], "the replay executed a step"
    resumed_by = [e.holder for _, e in faults.events("keeper") if isinstance(e, RunResumed)][-1]
    assert f"/{replayer.pid}/" in resumed_by
    report(
        f"R-28 unstorable results and exceptions [{faults.kind}]",
        seconds_to_failed=seconds_to_failed,
        seconds_to_failed_max=pct(seconds_to_failed.values(), 100),
        executions=executions,
        run_error=messages,
        replayed_failures={kind: list(v) for kind, v in seen.items()},
        imports_triggered_by_decode=len(imported_named),
    )
