"""R-26: compatible redeploys, and the offline replay checker's verdicts.

Runs of `more_flows.evolving` (steps count, pack -> Parcel, a hook, send) are recorded by
the original code (``WF_FAULT_VERSION`` unset), some left paused on the hook, some
completed. Two compatible deployments then resume paused runs, which must finish:

- ``appended``: a step appended after the last one;
- ``defaulted``: pack's result Struct gains a field with a default (old results decode).

The checker, `werkfluss.testing.check_replay` with ``events=`` exported from the server
(the checking processes point at no reachable server: offline), then judges every
recorded run under every deployment: the compatible ones above, R-25's incompatible
ones (``swapped``, ``renamed``, ``removed``, ``inserted``: `flows.deployed`'s runs too) and
two tail changes (``dropped-last``, ``last-renamed``) that are compatible with a run paused
before its last step and incompatible with a completed one (cadence-java-client #525).
There is no ``werkfluss`` CLI replay command to check as well (``werkfluss --help``).
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from werkfluss import get_events_async
from werkfluss._events import RunBlocked, encode_event

from ..conftest import ROOT
from . import flows, more_flows
from .harness import report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

INCOMPATIBLE = ("swapped", "renamed", "removed", "inserted")  # R-25's redeploys
TAIL = ("dropped-last", "last-renamed")  # incompatible only with runs that recorded the last step
VERSIONS = ("v1", "appended", "defaulted", *TAIL, *INCOMPATIBLE)

# A checking process, offline (no server reachable): prints {version: {run: [ok, message]}} for
# the deployments named in its arguments. The workflow bodies read VERSION when they run, so one
# process checks several deployments; ``defaulted`` changes a class at import: a process of its own.
CHECK = """
import json, sys
import msgspec
from werkfluss._events import decode_event
from werkfluss.testing import check_replay
from tests.faults import flows, more_flows
flows_by_id = {"faults:evolving": more_flows.evolving, "faults:deployed": flows.deployed}
runs = msgspec.msgpack.decode(open(sys.argv[1], "rb").read())
verdicts = {}
for version in sys.argv[2:]:
    flows.VERSION = more_flows.VERSION = version
    verdicts[version] = {}
    for run_id, workflow, raw in runs:
        checked = check_replay(flows_by_id[workflow], run_id, events=[decode_event(e) for e in raw])
        verdicts[version][run_id] = [checked.ok, None if checked.ok else checked.divergence.message]
print(json.dumps(verdicts))
"""

# (the checker passed it, it is compatible) -> the confusion matrix's cell
VERDICTS = {
    (True, True): "passed_compatible",
    (False, False): "flagged_incompatible",
    (True, False): "missed_incompatible",
    (False, True): "flagged_compatible",
}


def compatible(version: str, workflow: str, completed: bool) -> bool:
    """Whether `version` of the code can replay a run of `workflow` recorded by the original code."""
    if version in INCOMPATIBLE:
        return False
    if workflow == "faults:deployed":
        return True  # flows.deployed knows only R-25's versions: any other is its original code
    return not (version in TAIL and completed)


def test_r26_compatible_redeploys_resume_old_runs_and_the_checker_tells_them_apart(faults: Faults) -> None:
    faults.workers.module = "tests.faults.more_flows"
    original = faults.workers.start()
    resumed_on = {"appended": 0, "defaulted": 1}  # version -> n of the paused run it resumes
    evolving = {f"evolving-{n}": (n,) for n in range(4)}  # 0, 1: resumed; 2: stays paused; 3: completed
    deployed = {"deployed-10": (10,), "deployed-11": (11,)}  # 10 stays paused; 11 completed
    faults.enqueue(more_flows.evolving, evolving.items())
    faults.enqueue(flows.deployed, deployed.items())
    faults.wait_status([*evolving, *deployed], ["paused"])
    faults.invoke_hook(more_flows.evolve_token(3), "go-3")
    faults.invoke_hook(flows.deploy_token(11), "go-11")
    faults.wait_status(["evolving-3", "deployed-11"])
    original.send_signal(signal.SIGTERM)
    original.wait(30)

    recorded: list[tuple[str, str, list[bytes]]] = []
    for run_id in [*evolving, *deployed]:
        events = faults.call(functools.partial(get_events_async, run_id, settings=faults.settings))
        workflow = "faults:evolving" if run_id in evolving else "faults:deployed"
        recorded.append((run_id, workflow, [encode_event(e) for e in events]))
    export = faults.root / "exported-runs.msgpack"
    export.write_bytes(msgspec.msgpack.encode(recorded))
    completed = {run_id: faults.status(run_id) == "completed" for run_id, _, _ in recorded}

    offline = {**faults.env, "WERKFLUSS_REDIS_URL": "redis://127.0.0.1:9/0", "WERKFLUSS_PREFIX": "nowhere:"}
    offline.pop("WERKFLUSS_DIR", None)
    # Started first: they check while the compatible deployments resume runs.
    by_import = {"v1": [v for v in VERSIONS if v != "defaulted"], "defaulted": ["defaulted"]}
    checkers = [
        subprocess.Popen(
            [sys.executable, "-c", CHECK, str(export), *versions],
            cwd=ROOT,
            env={**offline, "WF_FAULT_VERSION": at},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for at, versions in by_import.items()
    ]
    results: dict[str, Any] = {}
    for version, n in resumed_on.items():
        worker = faults.workers.start(env={"WF_FAULT_VERSION": version})
        faults.invoke_hook(more_flows.evolve_token(n), f"go-{n}")
        faults.wait_status([f"evolving-{n}"], ["completed", "blocked", "failed"])
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        results[version] = faults.result(f"evolving-{n}") if faults.status(f"evolving-{n}") == "completed" else None
        assert results[version] == more_flows.expected_evolving(n, f"go-{n}", version), (
            version,
            faults.error(f"evolving-{n}"),
        )
    blocked = [r for r in evolving if any(isinstance(e, RunBlocked) for _, e in faults.events(r))]
    assert blocked == [], "a compatible change blocked a run"

    verdicts: dict[str, dict[str, list[Any]]] = {}
    for proc in checkers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        verdicts.update(json.loads(out))
    assert sorted(verdicts) == sorted(VERSIONS)

    matrix: Counter[str] = Counter()
    wrong = []
    for version, by_run in verdicts.items():
        for run_id, (ok, message) in by_run.items():
            workflow = "faults:evolving" if run_id in evolving else "faults:deployed"
            # Runs 0 and 1 were exported while paused, before their resume.
            expected = compatible(version, workflow, completed[run_id])
            matrix[VERDICTS[(ok, expected)]] += 1
            if ok != expected:
                wrong.append((version, run_id, "paused" if not completed[run_id] else "completed", message))
            if not ok:
                assert run_id in message and "#" in message, message
    report(
        f"R-26 compatible redeploys and the replay checker [{faults.kind}]",
        runs_resumed_on_compatible_code=f"{sum(v is not None for v in results.values())}/{len(resumed_on)}",
        confusion_matrix=dict(matrix),
        wrong_verdicts=wrong,
        cli_replay_check="none: werkfluss has no replay subcommand",
        example_flag=verdicts["dropped-last"]["evolving-3"][1],
    )
    assert wrong == [], wrong
