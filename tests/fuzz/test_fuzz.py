"""The differential fuzzer: random workflow programs, run in plain asyncio and on werkfluss
under random faults, must agree (see tests/fuzz/README.md).

CI runs a fixed, small budget: `derandomize=True`, so every CI run tries the same programs
and a failure reproduces from the commit alone; ``WERKFLUSS_FUZZ_EXAMPLES=N`` runs N examples
per test and server with fresh randomness (``WERKFLUSS_FUZZ_SEED`` fixes it) to explore.
No example database: nothing is written to the repository.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from werkfluss._store._open import close_stores

from ..faults.harness import LEASE, Faults
from ..workers import Workers, server_env
from .check import problems
from .conductor import HOLD, World, conduct
from .generate import IN_PROCESS, PROCESS, faults_for, programs
from .interpreter import Refused, reference
from .program import Program, to_python

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..conftest import Server
    from ..servers import RedisProcess
    from .generate import Fault

EXAMPLES = int(os.environ.get("WERKFLUSS_FUZZ_EXAMPLES", "0"))
SEED = os.environ.get("WERKFLUSS_FUZZ_SEED")
# A comma-separated subset of the modes (generate.IN_PROCESS, generate.PROCESS), to explore past a known bug.
ONLY = set(filter(None, os.environ.get("WERKFLUSS_FUZZ_MODES", "").split(",")))
_counter = itertools.count()


def modes(available: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(m for m in available if not ONLY or m in ONLY)
    if not chosen:
        pytest.skip(f"WERKFLUSS_FUZZ_MODES={','.join(sorted(ONLY))} leaves none of {available}")
    return chosen


def budget(ci_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings: `ci_examples` derandomized, or the long run's count."""
    chosen = settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        derandomize=not EXAMPLES and SEED is None,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    def apply(test: Callable[..., None]) -> Callable[..., None]:
        test = chosen(test)
        return seed(int(SEED))(test) if SEED is not None else test

    return apply


def sleeps(program: Program) -> float:
    """An upper bound on the time the program spends in durable sleeps."""
    return sum(
        float(x) for x in msgspec.json.encode(program).decode().split('"seconds":')[1:] for x in [x.split("}")[0]]
    )


def run_example(
    server: Server, redis: RedisProcess | None, program: Program, fault: Fault, *, in_process: bool, say: Any = note
) -> None:
    """Run the reference, then werkfluss under `fault`; fail with the program as Python on any problem."""
    root = Path(tempfile.mkdtemp(prefix=f"wf-fuzz-{next(_counter)}-"))
    prefix = f"fz{uuid.uuid4().hex[:8]}:"
    settings_ = msgspec.structs.replace(server.settings(prefix), lease=LEASE, hold=HOLD)
    faults = Faults(root, server_env(server, prefix), server.url, settings_, kind=server.kind)
    faults.env["WERKFLUSS_HOLD"] = str(HOLD)
    faults.workers = Workers(faults.env, root / "workers", "tests.fuzz.programs", concurrency=8)

    def restart() -> None:
        assert redis is not None
        redis.kill()
        redis.restart()

    world = World(faults, f"fz-{uuid.uuid4().hex[:8]}", restart if redis is not None else None)
    source = to_python(program, str(fault))
    say(source)
    # Steps executed in this process: the ledger and barriers, and the server for `send`'s deliveries.
    wanted = {k: v for k, v in faults.env.items() if k.startswith("WERKFLUSS_") or k == "WF_FAULT_DIR"}
    wanted.pop("WERKFLUSS_LEASE", None)
    previous = {k: os.environ.get(k) for k in [*wanted, "WERKFLUSS_DIR", "WERKFLUSS_REDIS_URL"]}
    for k in ("WERKFLUSS_DIR", "WERKFLUSS_REDIS_URL"):
        os.environ.pop(k, None)
    os.environ.update(wanted)

    async def main() -> list[str]:
        try:
            expected: list[str] | Refused = await reference(program)
        except Refused as exc:
            expected = exc
        say(f"reference: {expected!r}")
        try:
            await conduct(world, program, fault, in_process=in_process, seconds=sleeps(program))
            return await problems(world, program, expected, faulty=fault.mode in PROCESS and fault.mode != "processes")
        finally:
            with anyio.CancelScope(shield=True):
                await close_stores()

    found: list[str] = ["the run raised"]
    try:
        found = anyio.run(main, backend="asyncio")
    finally:
        faults.close()
        if not found:
            shutil.rmtree(root, ignore_errors=True)  # kept when something failed: the ledger, the worker logs
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not found, (
        f"{len(found)} problems under {fault} (ledger, logs: {root}):\n" + "\n".join(found[:12]) + f"\n\n{source}\n"
    )


@pytest.mark.timeout(600)
@budget(ci_examples=20)
@given(data=st.data())
def test_programs_agree_under_in_process_faults(fuzz_server: tuple[Server, RedisProcess | None], data: Any) -> None:
    """Concurrent starts in tasks and threads, an in-process Worker beside a start, a graceful
    hand-off between Workers mid-step, hooks early, late and twice."""
    program, sure = data.draw(programs(), label="program")
    fault = data.draw(faults_for(sure, modes(IN_PROCESS)), label="fault")
    run_example(*fuzz_server, program, fault, in_process=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@budget(ci_examples=6)
@given(data=st.data())
def test_programs_agree_under_process_faults(fuzz_server: tuple[Server, RedisProcess | None], data: Any) -> None:
    """start() scripts and worker processes SIGKILLed between steps, mid-step before and after the
    effect, after the run's end; hand-offs between them; several processes starting one run;
    the server SIGKILLed and restarted (Redis, appendfsync always)."""
    server, redis = fuzz_server
    program, sure = data.draw(programs(max_stmts=5), label="program")
    available = PROCESS if redis is not None else tuple(m for m in PROCESS if m != "restart")
    fault = data.draw(faults_for(sure, modes(available)), label="fault")
    run_example(server, redis, program, fault, in_process=False)
