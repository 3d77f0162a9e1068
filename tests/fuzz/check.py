"""The fuzzer's verdict on one werkfluss run of a program, against the reference.

`problems` returns every violated property, as text (empty: the run is right):

- the run's recorded result, and what every caller that was not killed saw, equal the
  reference trace; or, when the reference failed, the run failed with the same step
  error (type and message) and every caller raised it (StepFailedError, or
  RunFailedError when another process executed the run);
- every run (children too) is terminal; none is blocked, no log holds a RunBlocked:
  an unchanged program must never be non-deterministic;
- each ``(run, seq)`` has at most one StepCompleted;
- every completed step's effect (keyed by `step_key()`) was applied exactly once, and
  no effect was applied for a step that never completed;
- no step body started after its completion was recorded (no completed step ran
  again); without kills or restarts, each step executed exactly as often as its kind
  says (1, flaky: fail_first + 1, broken: retries + 1); with them, at most once more;
- hooks the completed run awaited are closed: a further payload raises HookClosedError.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from werkfluss import HookClosedError, invoke_hook_async
from werkfluss._events import RunBlocked, StepCompleted, StepFailed

from .interpreter import Refused
from .program import Await, Child, NewHook

if TYPE_CHECKING:
    from .conductor import World
    from .program import Body, Program

__all__ = ["awaited_tokens", "problems"]


def awaited_tokens(body: Body, handles: dict[str, str] | None = None) -> set[str]:
    """Tokens the program surely claimed: those it awaited alone."""
    handles = {} if handles is None else handles
    found: set[str] = set()
    for s in body.stmts:
        if isinstance(s, NewHook):
            handles[s.handle] = s.token
        elif isinstance(s, Await):
            found.add(handles[s.handle])
        elif isinstance(s, Child):
            found |= awaited_tokens(s.body, {})
    return found


def _caller_problems(world: World, expected: list[str] | Refused) -> list[str]:
    out = []
    for name, seen in sorted(world.outcomes.items()):
        if seen == ["killed"]:
            continue
        if isinstance(expected, Refused):
            ok = seen[0] == "error" and (
                (seen[1] == "StepFailedError" and seen[2:] == [expected.error_type, expected.error_message])
                or (seen[1] == "RunFailedError" and str(seen[3]).endswith(str(expected)))
            )
        else:
            ok = seen == ["result", expected]
        if not ok:
            out.append(f"caller {name} saw {seen!r}")
    return out


async def problems(world: World, program: Program, expected: list[str] | Refused, *, faulty: bool) -> list[str]:
    """Everything wrong with the werkfluss run of `program` (see the module docstring)."""
    faults, top = world.faults, world.run_id
    out = _caller_problems(world, expected)
    status = faults.status(top)
    if isinstance(expected, Refused):
        error = faults.error(top)
        if (
            status != "failed"
            or not error.startswith("werkfluss.StepFailedError: ")
            or not error.endswith(str(expected))
        ):
            out.append(f"the run is {status!r} with {error!r}; the reference failed with {expected}")
    elif status != "completed":
        out.append(f"the run is {status!r} ({faults.error(top)}); the reference returned")
    elif faults.result(top) != expected:
        out.append(f"the run recorded {faults.result(top)!r}")

    rows = faults.ledger()
    execs: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        if r.kind == "exec":
            execs[r.key].append(r)
    # The sink's own record: one file per key, created with O_EXCL. Its "applied" ledger row
    # follows the file and is lost when a kill of a sibling step's process lands in between.
    applied = Counter(path.name.replace("%2F", "/") for path in (faults.root / "effects").iterdir())
    completed: dict[str, float] = {}
    failed_for_good: set[str] = set()
    for run_id in faults.all_runs():
        run_status = faults.status(run_id)
        if run_status not in ("completed", "failed") or (run_status == "failed" and run_id != top):
            out.append(f"run {run_id} is {run_status!r}: {faults.error(run_id)}")
        seqs: Counter[int] = Counter()
        for _, event in faults.events(run_id):
            if isinstance(event, RunBlocked):
                out.append(f"run {run_id} was blocked: {event.error.message}")
            elif isinstance(event, StepCompleted) and event.step != "fz.child":
                seqs[event.seq] += 1
                completed.setdefault(f"{run_id}:{event.seq}", event.time)
            elif isinstance(event, StepFailed) and event.final:
                failed_for_good.add(f"{run_id}:{event.seq}")
        out += [f"{run_id}:{seq} completed {n} times" for seq, n in seqs.items() if n > 1]
    for key, when in completed.items():
        if applied[key] != 1:
            out.append(f"step {key} ({_label(execs, key)}) completed with {applied[key]} effects applied")
        late = [r for r in execs[key] if r.time > when]
        if late:
            out.append(f"step {key} ({_label(execs, key)}) executed again after it completed (pid {late[0].pid})")
    out += [f"effect {key} applied, its step never completed" for key in applied if key not in completed]
    for key, runs in execs.items():
        expected_runs, n = int(runs[0].extra[1]), len(runs)
        if key in failed_for_good and isinstance(expected, Refused):
            # A caller that starts the failed run resumes it: the failed step runs again, once per caller.
            bound = expected_runs * (len(world.outcomes) + 1) + faulty
            ok = (n % expected_runs == 0 or faulty) and n <= bound
        elif key not in completed and key not in failed_for_good:
            ok = n <= 1 + faulty  # a race's loser, cancelled
        else:
            ok = expected_runs <= n <= expected_runs + faulty if faulty else n == expected_runs
        if not ok:
            out.append(f"step {key} ({_label(execs, key)}) executed {n} times, expected {expected_runs}")
    if status == "completed" and not isinstance(expected, Refused):
        for token in sorted(awaited_tokens(program.body)):
            try:
                await invoke_hook_async(token, "after the end", settings=world.settings)
            except HookClosedError:
                continue
            out.append(f"hook {token!r} of the completed run accepted another payload")
    return out


def _label(execs: dict[str, list[Any]], key: str) -> str:
    return execs[key][0].extra[0] if execs.get(key) else "?"
