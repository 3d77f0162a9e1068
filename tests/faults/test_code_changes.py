"""R-25: runs parked after steps A and B meet redeployed code: A and B swapped, B renamed,
B removed, a step inserted before B. Each is a worker process importing `tests.faults.flows`
with ``WF_FAULT_VERSION`` set, read once at import like a deployment.

Each run must be parked as ``blocked`` with a `NonDeterminismError` naming the run, the
sequence number, the recorded step and the step now called; nothing executes past the
divergence, nothing retries it hot; and the fixed deployment (the original code) resumes
and completes it.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import pytest

from werkfluss._events import RunBlocked, RunResumed

from . import flows
from .harness import DEADLINE, report

if TYPE_CHECKING:
    from .harness import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# version -> (seq of the divergence, step recorded there, step the new code calls there)
CHANGES = {
    "swapped": (1, "faults:A", "faults:B"),
    "renamed": (2, "faults:B", "faults:B-renamed"),
    "removed": (2, "faults:B", f"hook:{flows.deploy_token(2)}"),
    "inserted": (2, "faults:B", "faults:X"),
}


def test_r25_redeployed_code_that_diverges_blocks_the_run_until_the_fix(faults: Faults) -> None:
    runs = {f"deployed-{version}": (n,) for n, version in enumerate(CHANGES)}
    payloads = {flows.deploy_token(args[0]): f"go-{args[0]}" for args in runs.values()}
    reference = faults.reference(flows.deployed, runs, hooks=payloads)
    original = faults.workers.start()
    faults.enqueue(flows.deployed, runs.items())
    faults.wait_status(runs, ["paused"])  # A and B recorded, parked on the hook
    original.send_signal(signal.SIGTERM)
    original.wait(30)

    messages: dict[str, str] = {}
    executed_after_divergence = 0
    for (version, (seq, recorded, called)), (run_id, (n,)) in zip(CHANGES.items(), runs.items(), strict=True):
        deployed = faults.workers.start(env={"WF_FAULT_VERSION": version})
        since = time.time()
        faults.invoke_hook(flows.deploy_token(n), f"go-{n}")  # wakes the run, under the new code
        faults.wait_status([run_id], ["blocked"])
        faults.wait(lambda: faults.pending_messages() == 0, "the worker to finish with the message")
        executed_after_divergence += sum(1 for r in faults.ledger("exec") if r.time >= since)
        messages[version] = faults.error(run_id)
        # Not retried hot: no message left for it, no timer entry, one resume under the new code.
        assert faults.client.xlen(f"{faults.prefix}{{q}}:queue") == 0
        assert faults.client.zscore(f"{faults.prefix}{{q}}:timers", run_id) is None
        assert [type(e) for _, e in faults.events(run_id)][-2:] == [RunResumed, RunBlocked]
        deployed.send_signal(signal.SIGTERM)
        deployed.wait(30)
        error = messages[version]
        assert error.split(":")[0].endswith("NonDeterminismError"), error
        facts = [repr(run_id), f"#{seq}", repr(recorded), repr(called)]
        assert all(fact in error for fact in facts), (facts, error)
    assert executed_after_divergence == 0

    faults.workers.start()  # the fix: the original code again
    faults.enqueue(flows.deployed, runs.items())  # a blocked run is put back on the queue to resume
    faults.wait_status(runs)
    figures = faults.check(reference.result(DEADLINE))
    report(
        f"R-25 redeploys that diverge [{faults.kind}]",
        **figures,
        message_has_run_seq_recorded_called=dict.fromkeys(messages, "yes"),
        steps_executed_after_divergence=executed_after_divergence,
        resumed_after_fix=f"{sum(faults.status(r) == 'completed' for r in runs)}/{len(runs)}",
        example_message=messages["swapped"][:200],
    )
