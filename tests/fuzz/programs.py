"""The fixed werkfluss workflows and steps the fuzzer's programs run on
(``werkfluss worker tests.fuzz.programs``; ``start()`` scripts import it too).

`interpret` and `child` take a program body as their first argument and interpret
it with `tests.fuzz.interpreter.run_body` over werkfluss's primitives. Every step
body goes through `_body`, which uses the fault suite's ledger and barriers
(tests/faults/flows.py, active only with ``WF_FAULT_DIR`` set):

- ``exec <step_key()> <pid> <time> <label> <executions expected>`` when the body starts,
  after the barrier ``fz-enter@<label>`` (a kill there is a kill between steps);
- the barrier ``fz-before@<label>``, then the step's external effect, applied by
  `apply_effect` through a sink that deduplicates on the step key, then
  ``fz-after@<label>`` (kills mid-step, before or after the effect).

A flaky step fails while the ledger holds at most `fail_first` executions of its key:
deterministic across processes and replays, unlike randomness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from werkfluss import RetryPolicy, StepFailedError, hook, invoke_hook_async, race, sleep, step, step_key, workflow

from ..faults.flows import apply_effect, barrier, fault_dir, row
from ..faults.harness import read_ledger
from .interpreter import SLOW, Box, Ops, broken_message, run_body, value_of
from .program import BROKEN_RETRIES, FLAKY_RETRIES, Body, Data, StepCall

if TYPE_CHECKING:
    from werkfluss import Step

__all__ = [
    "WerkflussOps",
    "broken",
    "child",
    "counts",
    "flaky",
    "interpret",
    "nested",
    "plain",
    "send",
    "slow",
    "tags",
]


async def _body(label: str, expected: int) -> None:
    """What every step does first: the barrier between steps, then the execution's ledger row."""
    await barrier("fz-enter", label)
    row("exec", step_key(), label, str(expected))


async def _effect(label: str) -> None:
    await barrier("fz-before", label)
    apply_effect(step_key())
    await barrier("fz-after", label)


@step(name="fz.plain")
async def plain(label: str, inputs: list[Any]) -> str:
    await _body(label, 1)
    await _effect(label)
    return value_of("plain", label, inputs)  # type: ignore[no-any-return]


@step(name="fz.nested")
async def nested(label: str, inputs: list[Any]) -> Box:
    await _body(label, 1)
    await _effect(label)
    return value_of("nested", label, inputs)  # type: ignore[no-any-return]


@step(name="fz.counts")
async def counts(label: str, inputs: list[Any]) -> dict[str, int]:
    await _body(label, 1)
    await _effect(label)
    return value_of("counts", label, inputs)  # type: ignore[no-any-return]


@step(name="fz.tags")
async def tags(label: str, inputs: list[Any]) -> list[str]:
    """Annotated ``list[str]``, returns a tuple: a common slip that must not make live and replay differ."""
    await _body(label, 1)
    await _effect(label)
    return value_of("tags", label, inputs)  # type: ignore[no-any-return]


@step(name="fz.flaky", retries=RetryPolicy(retries=FLAKY_RETRIES, backoff="constant", base=0.01))
async def flaky(label: str, inputs: list[Any], fail_first: int = 0) -> str:
    await _body(label, fail_first + 1)
    key = step_key()
    where = fault_dir()
    executions = sum(1 for r in read_ledger(where / "ledger") if r.kind == "exec" and r.key == key) if where else 1
    if executions <= fail_first:
        raise ConnectionError(f"{label} flaked ({executions} of {fail_first})")
    await _effect(label)
    return value_of("plain", label, inputs)  # type: ignore[no-any-return]


@step(name="fz.broken", retries=RetryPolicy(retries=BROKEN_RETRIES, backoff="constant", base=0.01))
async def broken(label: str, inputs: list[Any]) -> str:
    await _body(label, BROKEN_RETRIES + 1)
    raise ValueError(broken_message(label))


@step(name="fz.slow")
async def slow(label: str, inputs: list[Any]) -> str:
    await _body(label, 1)
    await sleep(SLOW)  # in a step: a plain sleep, cancelled when the race is won
    await _effect(label)
    return value_of("plain", label, inputs)  # type: ignore[no-any-return]


@step(name="fz.send")
async def send(label: str, inputs: list[Any], token: str, payload: str) -> str:
    """Deliver a hook payload from inside a step, to the run's own server and prefix."""
    await _body(label, 1)
    await invoke_hook_async(token, payload)
    await _effect(label)
    return value_of("plain", label, inputs)  # type: ignore[no-any-return]


STEPS: dict[str, Step[[str, list[Any]], Any]] = {
    "plain": plain,
    "nested": nested,
    "counts": counts,
    "tags": tags,
    "broken": broken,
    "slow": slow,
}


class WerkflussOps(Ops):
    """werkfluss's primitives for `run_body`."""

    failure = StepFailedError

    def step(self, call: StepCall, label: str, inputs: list[Any]) -> Any:
        if call.kind == "flaky":
            return flaky(label, inputs, call.fail_first)
        if call.kind == "send":
            return send(label, inputs, call.token, call.payload)
        return STEPS[call.kind](label, inputs)

    def hook(self, token: str) -> Any:
        return hook(token)

    async def await_hook(self, handle: Any) -> Any:
        return await handle

    def race(self, arms: list[Any]) -> Any:
        return race(*arms)

    def sleep(self, seconds: float) -> Any:
        return sleep(seconds)

    def child(self, body: Body, data: Data) -> Any:
        return child(body, data.mapping, data.names, data.pair)


@workflow(name="fz.interpret")
async def interpret(body: Body, mapping: dict[str, int], names: list[str], pair: tuple[str, ...]) -> list[str]:
    """Run `body` against the workflow's arguments; the trace is the result."""
    return await run_body(WerkflussOps(), body, Data(mapping, names, pair))


@workflow(name="fz.child")
async def child(body: Body, mapping: dict[str, int], names: list[str], pair: tuple[str, ...]) -> list[str]:
    return await run_body(WerkflussOps(), body, Data(mapping, names, pair))
