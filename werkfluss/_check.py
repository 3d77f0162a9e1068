"""The pre-deploy check: replay every in-flight run against the code in this checkout.

`check_deploy(module)` (and ``werkfluss check MODULE``) finds the runs of the
module's workflows that a deploy would meet half-way (paused, failed,
blocked, running, and pending ones that have recorded something), and
replays each with the engine's replayer (the executor of
`werkfluss.testing.check_replay`, stopping where the history ends): no step
executes, nothing is written. Each run gets a verdict:

- ``clean``: the current code replays it;
- ``patched``: it replays, and the replay took a patch marker's branch
  (`RunVerdict.patches`: True the new branch, False the old one);
- ``diverges``: the code calls something else at a recorded seq, or calls
  a recorded step with other arguments (`RunVerdict.mismatch`);
- ``schema``: a recorded value no longer decodes to the type the code
  annotates now (a step's result, the workflow's arguments, a hook's
  payload on the replayed path): `RunVerdict.schema` names each one.

A run that diverges or fails on its schema would be parked as blocked on
the new code. Bounded: runs are read a page at a time (`list_runs`'s
cursor) and checked a few at once; only the verdicts that would block are
kept (`DeployCheck.blocking`), so memory stays flat for any number of
runs. `iter_check_async` streams every verdict instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec

from ._engine._executor import RunExecutor
from ._engine._replay import Replay
from ._errors import ConfigurationError, NonDeterminismError, RunNotFoundError, SerializationError
from ._events import ErrorInfo, HookReceived, RunFailed, RunStarted, StepCompleted, StepFailed
from ._ids import registered_workflow
from ._options import Settings
from ._queries import get_events_async, list_runs_async
from ._sync import blocking
from ._wrappers import Step, Workflow

if TYPE_CHECKING:
    from ._engine._executor import Body
    from ._events import AnyEvent
    from ._queries import RunSummary

__all__ = [
    "DeployCheck",
    "Found",
    "Mismatch",
    "RunVerdict",
    "SchemaProblem",
    "Verdict",
    "check_deploy",
    "check_deploy_async",
    "check_events",
    "first_mismatch",
    "in_flight_workflows",
    "iter_check_async",
    "steps_of",
]

Verdict = Literal["clean", "patched", "diverges", "schema"]
"""What a deploy of the current code would do to a run: replay it (``clean``, ``patched``)
or park it as blocked (``diverges``, ``schema``)."""

IN_FLIGHT = ("pending", "running", "paused", "failed", "blocked")
_PAGE = 200  # runs listed per query: the most held in memory at once


@dataclass(frozen=True, slots=True)
class Mismatch:
    """Where the current code stops matching a run's log.

    Attributes:
        seq: The recorded call's sequence number (None: the workflow's outcome differs).
        recorded: What the log recorded there (a step ID, ``hook:<token>``, ``sleep``, ``race``).
        recorded_args: The recorded step's arguments, as a call's text (``"('o-1')"``), when the log has them.
        current: What the current code calls there, or what it does instead.
        message: All of it in one sentence.
    """

    seq: int | None
    recorded: str
    recorded_args: str | None
    current: str
    message: str


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    """A recorded value that no longer decodes to the type the current code annotates.

    Attributes:
        seq: The recorded call's sequence number (None for the workflow's arguments).
        owner: The step or workflow ID, or ``hook '<token>'``.
        where: ``"result"``, ``"payload"``, ``"argument 0"``...
        error: The decode error.
    """

    seq: int | None
    owner: str
    where: str
    error: str


@dataclass(frozen=True, slots=True)
class RunVerdict:
    """One in-flight run, replayed against the current code.

    Attributes:
        run_id: The run.
        workflow: Its workflow's ID.
        status: Its status when it was listed.
        verdict: ``clean``, ``patched``, ``diverges`` or ``schema``.
        replayed: How many recorded calls the current code made again, in order.
        mismatch: Where it diverges (verdict ``diverges``).
        schema: The recorded values that no longer decode (verdict ``schema``).
        patches: The patch markers the replay met: True took the new branch, False the old one.
    """

    run_id: str
    workflow: str
    status: str
    verdict: Verdict
    replayed: int
    mismatch: Mismatch | None = None
    schema: tuple[SchemaProblem, ...] = ()
    patches: dict[str, bool] = field(default_factory=dict)

    @property
    def blocks(self) -> bool:
        """True when the current code would park this run as blocked."""
        return self.verdict in ("diverges", "schema")

    def describe(self) -> str:
        """The verdict in a line: ``diverges at #2: recorded check.b('o-1'), now calls 'check.c'``."""
        patches = "; ".join(f"patch {n!r}: {'new' if b else 'old'} branch" for n, b in sorted(self.patches.items()))
        if self.verdict in ("clean", "patched"):
            return "replays" + (f"; {patches}" if patches else "")
        if self.verdict == "schema":
            first = self.schema[0]
            at = f"#{first.seq} " if first.seq is not None else ""
            more = f" (+{len(self.schema) - 1} more)" if len(self.schema) > 1 else ""
            return f"schema: {at}{first.owner} {first.where} no longer decodes: {first.error}{more}"
        m = self.mismatch
        assert m is not None  # a divergence always has its mismatch
        if m.seq is None:
            return f"diverges: {m.message}"
        recorded = m.recorded + (m.recorded_args or "")
        return f"diverges at #{m.seq}: recorded {recorded}, now {m.current}"


@dataclass(slots=True)
class DeployCheck:
    """The outcome of `check_deploy`: counts, and the runs that would block.

    Attributes:
        workflows: The workflow IDs checked.
        checked: How many in-flight runs were replayed.
        clean: How many replay (``patched`` ones included).
        patched: How many of those took a patch marker's branch.
        diverged: How many diverge.
        schema: How many have a recorded value that no longer decodes.
        fresh: Pending runs that recorded nothing yet, not replayed (they start on the new code).
        truncated: `limit` stopped the check before every run was seen.
        blocking: The verdicts of the runs that would block (diverges or schema).
    """

    workflows: list[str]
    checked: int = 0
    clean: int = 0
    patched: int = 0
    diverged: int = 0
    schema: int = 0
    fresh: int = 0
    truncated: bool = False
    blocking: list[RunVerdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the current code replays every in-flight run checked."""
        return not self.diverged and not self.schema

    def add(self, verdict: RunVerdict) -> None:
        """Count `verdict` (and keep it if it would block)."""
        self.checked += 1
        if verdict.verdict == "diverges":
            self.diverged += 1
        elif verdict.verdict == "schema":
            self.schema += 1
        else:
            self.clean += 1
            self.patched += verdict.verdict == "patched"
        if verdict.blocks:
            self.blocking.append(verdict)

    def summary(self) -> str:
        """``12 runs: 9 clean, 2 diverge, 1 schema`` (with the patched and fresh counts when there are any)."""
        text = f"{self.checked} run{'s' if self.checked != 1 else ''}: {self.clean} clean"
        if self.patched:
            text += f" ({self.patched} patched)"
        text += f", {self.diverged} diverge, {self.schema} schema"
        if self.fresh:
            text += f"; {self.fresh} pending with no history not replayed"
        if self.truncated:
            text += "; stopped at the limit, more runs not checked"
        return text

    def counts(self) -> dict[str, int]:
        """The counts as a dict, for JSON."""
        return {
            "checked": self.checked,
            "clean": self.clean,
            "patched": self.patched,
            "diverged": self.diverged,
            "schema": self.schema,
            "fresh": self.fresh,
        }


Target = Workflow[Any, Any] | Iterable[Workflow[Any, Any]] | ModuleType | str


def in_flight_workflows(target: Target) -> list[Workflow[Any, Any]]:
    """The workflows `target` names: a workflow, several, a module (every workflow it
    holds at its top level), or a module's import name (``"app.flows"``, ``"app.flows:attr"``).

    Raises:
        ConfigurationError: the module does not import, or it defines no workflows.
    """
    if isinstance(target, str):
        target = _import(target)
    if isinstance(target, Workflow):
        return [_definition(target)]
    if isinstance(target, ModuleType):
        found = {w.id: _definition(w) for w in vars(target).values() if isinstance(w, Workflow)}
        if not found:
            raise ConfigurationError(f"module {target.__name__!r} defines no workflows")
        return [found[i] for i in sorted(found)]
    flows = [_definition(w) for w in target]  # type: ignore[union-attr]  # a module was handled above
    if not flows or not all(isinstance(w, Workflow) for w in flows):
        raise ConfigurationError(f"check_deploy needs workflows or a module, not {target!r}")
    return flows


def _definition(flow: Workflow[Any, Any]) -> Workflow[Any, Any]:
    """The registered definition of `flow`'s ID (an `options()` copy is the same code)."""
    held = registered_workflow(flow.id)
    return held if isinstance(held, Workflow) else flow


def _import(spec: str) -> ModuleType | Workflow[Any, Any]:
    """The module `spec` names (``app.flows``), or the workflow (``app.flows:checkout``)."""
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current project
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a module that raises while importing is as unusable as a missing one
        raise ConfigurationError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    if not attr:
        return module
    value = getattr(module, attr, None)
    if not isinstance(value, Workflow):
        raise ConfigurationError(f"module {module_name!r} has no workflow {attr!r}")
    return value


async def iter_check_async(
    target: Target,
    *,
    workflow: str | None = None,
    limit: int | None = None,
    concurrency: int = 8,
    settings: Settings | None = None,
    report: DeployCheck | None = None,
) -> AsyncIterator[RunVerdict]:
    """Yield the verdict of every in-flight run of `target`'s workflows, a page at a time.

    Args:
        target: What `in_flight_workflows` takes.
        workflow: Only the runs of this workflow ID (one of `target`'s).
        limit: Check at most this many runs (default: all).
        concurrency: Runs replayed at once (their logs are read concurrently).
        settings: Where the runs live (default: `Settings.from_env()`).
        report: Counted into as the runs are checked (`check_deploy` passes its own).

    Raises:
        ConfigurationError: a bad target, `workflow` not among its workflows, a bad `limit`.
        StorageError: Redis/Valkey is unreachable.
    """
    flows = {w.id: w for w in in_flight_workflows(target)}
    if workflow is not None:
        if workflow not in flows:
            raise ConfigurationError(f"workflow {workflow!r} is not defined there; it defines {', '.join(flows)}")
        flows = {workflow: flows[workflow]}
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"invalid limit {limit!r}: use a positive number of runs")
    if concurrency < 1:
        raise ConfigurationError(f"invalid concurrency {concurrency!r}: use at least 1")
    settings = settings or Settings.from_env()
    report = report if report is not None else DeployCheck(sorted(flows))
    only = next(iter(flows)) if len(flows) == 1 else None  # list_runs filters one workflow itself
    cursor: str | None = None
    budget = limit  # runs still to replay; pending ones that recorded nothing do not count
    while True:
        page = await list_runs_async(workflow=only, limit=_PAGE, cursor=cursor, settings=settings)
        runs = [r for r in page.runs if r.workflow in flows and r.status in IN_FLIGHT]
        while runs:
            batch, runs = (runs, []) if budget is None else (runs[:budget], runs[budget:])
            for verdict in await _check_page(batch, flows, concurrency, settings):
                if verdict is None:  # pending with nothing recorded, or gone meanwhile
                    report.fresh += 1
                    continue
                report.add(verdict)
                yield verdict
                if budget is not None:
                    budget -= 1
            if budget == 0:
                report.truncated = bool(runs) or page.cursor is not None
                return
        cursor = page.cursor
        if cursor is None:
            return


async def check_deploy_async(
    target: Target,
    *,
    workflow: str | None = None,
    limit: int | None = None,
    concurrency: int = 8,
    settings: Settings | None = None,
) -> DeployCheck:
    """Replay every in-flight run of `target`'s workflows against the current code; execute no step.

    Returns the counts and the verdicts of the runs that would block
    (`DeployCheck.ok` when there are none). Arguments as `iter_check_async`.

    Raises:
        ConfigurationError: a module that does not import or defines no workflows, a bad option.
        StorageError: Redis/Valkey is unreachable.
    """
    flows = in_flight_workflows(target)
    report = DeployCheck(sorted(w.id for w in flows if workflow is None or w.id == workflow))
    async for _ in iter_check_async(
        flows, workflow=workflow, limit=limit, concurrency=concurrency, settings=settings, report=report
    ):
        pass
    return report


def check_deploy(
    target: Target,
    *,
    workflow: str | None = None,
    limit: int | None = None,
    concurrency: int = 8,
    settings: Settings | None = None,
) -> DeployCheck:
    """Blocking twin of `check_deploy_async`."""
    return blocking(
        "check_deploy",
        lambda: check_deploy_async(target, workflow=workflow, limit=limit, concurrency=concurrency, settings=settings),
    )


async def _check_page(
    runs: list[RunSummary], flows: dict[str, Workflow[Any, Any]], concurrency: int, settings: Settings
) -> list[RunVerdict | None]:
    """The verdicts on a page of runs, in its order; `concurrency` replayed at once."""
    steps = {flow.id: steps_of(flow) for flow in flows.values()}
    verdicts: list[RunVerdict | None] = [None] * len(runs)
    todo = iter(range(len(runs)))

    async def worker() -> None:
        for i in todo:  # shared: each index goes to one worker
            run = runs[i]
            flow = flows[run.workflow]
            verdicts[i] = await _check_run(flow, steps[flow.id], run.run_id, run.status, settings)

    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, len(runs))):
            tg.start_soon(worker)
    return verdicts


# -- one run -----------------------------------------------------------------------------


async def _check_run(
    flow: Workflow[Any, Any], steps: dict[str, Step[Any, Any]], run_id: str, status: str, settings: Settings
) -> RunVerdict | None:
    """Replay one run; None when there is nothing to replay (pending with no history, or gone)."""
    try:
        events = await get_events_async(run_id, settings=settings)
    except RunNotFoundError:
        return None  # removed since it was listed
    return await check_events(flow, run_id, status, events, steps=steps)


async def check_events(
    flow: Workflow[Any, Any],
    run_id: str,
    status: str,
    events: list[AnyEvent],
    *,
    steps: dict[str, Step[Any, Any]] | None = None,
) -> RunVerdict | None:
    """The verdict on run `run_id` of `flow` from its `events`, offline (None: a pending
    run that recorded nothing yet, which simply starts on the current code, if its
    arguments still decode).

    `steps`: the steps whose recorded results are decoded to their current
    annotation, by ID (default: `steps_of(flow)`).
    """
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    replay = Replay()
    for index, event in enumerate(events, 1):
        replay.add(index, event)
    if started is None:
        return None
    try:
        args, kwargs = flow.decode_call(started.args)
    except SerializationError as exc:  # a pending run too: it would fail as it starts
        schema = [SchemaProblem(None, flow.id, exc.where or "arguments", _reason(exc))]
        schema += _recorded_results(steps_of(flow) if steps is None else steps, events)
        return RunVerdict(run_id, flow.id, status, "schema", 0, schema=tuple(schema))
    if status == "pending" and not replay.labels:
        return None
    schema = list(_recorded_results(steps_of(flow) if steps is None else steps, events))
    # The engine's executor, stopping where the recorded history ends instead of going on live.
    checker = RunExecutor.replayer(flow, run_id, replay)
    outcome = await checker.replay_body(args, kwargs)
    replayed = len(checker.reached or ())
    patches = dict(getattr(checker, "patches", None) or {})  # patch markers' decisions, where the engine has them
    error = outcome.error
    if isinstance(error, SerializationError) and not isinstance(error, NonDeterminismError):
        # A recorded value on the replayed path that no longer decodes (a hook's payload,
        # a result the scan above could not type): the replay stopped there.
        seq = _seq_of(error, replay)
        if not any((p.owner, p.where) == (error.step_id, error.where) for p in schema):
            schema.append(SchemaProblem(seq, error.step_id or flow.id, error.where or "value", _reason(error)))
    mismatch = None if schema and checker.diverged is None else _mismatch(checker, outcome, events)
    if schema:
        first = min((p.seq for p in schema if p.seq is not None), default=0)
        if mismatch is None or mismatch.seq is None or mismatch.seq >= first:
            ordered = tuple(sorted(schema, key=lambda p: -1 if p.seq is None else p.seq))
            return RunVerdict(run_id, flow.id, status, "schema", replayed, schema=ordered, patches=patches)
    if mismatch is not None:
        return RunVerdict(run_id, flow.id, status, "diverges", replayed, mismatch=mismatch, patches=patches)
    return RunVerdict(run_id, flow.id, status, "patched" if patches else "clean", replayed, patches=patches)


def _recorded_results(steps: dict[str, Step[Any, Any]], events: list[AnyEvent]) -> Iterable[SchemaProblem]:
    """Every completed step's recorded result that does not decode to its step's current annotation.

    The steps are those the workflow's module names (the body calls them by
    those names) and the workflows defined in this process (child runs); a
    step it cannot find is left to the replay, which decodes what it reaches.
    """
    for event in events:
        if not isinstance(event, StepCompleted):
            continue
        owner: Step[Any, Any] | Workflow[Any, Any] | None = steps.get(event.step)
        if owner is None:
            child = registered_workflow(event.step)
            if not isinstance(child, Workflow):
                continue
            owner = child
        kind = owner.return_type()
        if kind is Any:
            continue
        try:
            msgspec.msgpack.decode(event.result, type=kind)
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            yield SchemaProblem(event.seq, event.step, "result", str(exc))


def steps_of(flow: Workflow[Any, Any]) -> dict[str, Step[Any, Any]]:
    """The steps `flow`'s module holds at its top level, by ID: those its body can call by name."""
    scope = getattr(flow.fn, "__globals__", {})
    return {s.id: s for s in list(scope.values()) if isinstance(s, Step)}


def _seq_of(error: SerializationError, replay: Replay) -> int | None:
    """The recorded seq `error` is about: a hook's (its owner is ``hook '<token>'``) or a step's."""
    owner = error.step_id or ""
    if owner.startswith("hook '") and owner.endswith("'"):
        label = f"hook:{owner[6:-1]}"
    else:
        label = owner
    return min((seq for seq, was in replay.labels.items() if was == label), default=None)


def _reason(error: SerializationError) -> str:
    """The decode error inside a `SerializationError`'s message, without its advice."""
    text = str(error)
    _, _, rest = text.partition(": ")
    head, sep, _ = rest.rpartition(". Did ")
    return head if sep else rest or text


@dataclass(frozen=True, slots=True)
class Found:
    """The first mismatch between a replayed run's code and its log (see `first_mismatch`).

    Attributes:
        kind: ``"call"`` (the code calls something else at `seq`), ``"missing"`` (it ended
            without calling what the log recorded at `seq`), ``"outcome"`` (it raises what
            the log did not record).
        seq: The recorded call's sequence number (None for ``"outcome"``).
        recorded: What the log recorded there, or the recorded error type, or ``"nothing"``.
        did: What the code did instead: the call it makes, ``"returned"``/``"raised X"``,
            or the error type it raises now.
        arguments: For ``"call"``, the arguments that differ when that is the difference.
        message: All of it in one sentence.
    """

    kind: str
    seq: int | None
    recorded: str
    did: str
    arguments: str | None
    message: str


def first_mismatch(checker: RunExecutor, outcome: Body, failed: RunFailed | None) -> Found | None:
    """The first mismatch a `RunExecutor.replayer` found between the code and the log, or None.

    The one rule behind `werkfluss check` and `werkfluss.testing.check_replay`; each words it its own way.
    """
    where = f"run {checker.run_id!r}"
    if checker.diverged is not None:
        d = checker.diverged
        return Found("call", d.seq, d.recorded, d.called, d.arguments, str(d))
    if checker.frontier is not None:
        return None  # the code got past everything recorded before this point
    reached = checker.reached or set()
    missing = sorted(seq for seq in checker.replay.labels if seq not in reached)
    if missing:
        seq = missing[0]
        recorded = checker.replay.labels[seq]
        ended = "returned" if outcome.returned else f"raised {type(outcome.error).__name__}"
        message = f"{where}: step #{seq} was recorded as {recorded!r} but the workflow now {ended} without calling it"
        return Found("missing", seq, recorded, ended, None, message)
    if outcome.error is not None:
        now = ErrorInfo.from_exception(outcome.error)
        if failed is None or failed.error.type != now.type:
            before = f"recorded {failed.error.type}" if failed else "did not record a failure there"
            message = f"{where}: the workflow now raises {now.type}: {now.message}; the log {before}"
            return Found("outcome", None, failed.error.type if failed else "nothing", now.type, None, message)
    return None


def _mismatch(checker: RunExecutor, outcome: Body, events: list[AnyEvent]) -> Mismatch | None:
    """`first_mismatch`, with the recorded step's arguments, worded for the check's report."""
    failed = next((e for e in reversed(events) if isinstance(e, RunFailed)), None)
    found = first_mismatch(checker, outcome, failed)
    if found is None:
        return None
    if found.kind == "call":
        current = f"calls {found.did!r}" if found.arguments is None else f"calls it with {found.arguments}"
    elif found.kind == "missing":
        current = f"{found.did} without calling it"
    else:
        current = f"raises {found.did}"
    args = None if found.seq is None else _recorded_args(events, found.seq)
    return Mismatch(found.seq, found.recorded, args, current, found.message)


def _recorded_args(events: list[AnyEvent], seq: int) -> str | None:
    """The arguments the log recorded for step `seq`, as a call's: ``('o-1')``, ``('o-1', note='x')``."""
    for event in events:
        if isinstance(event, StepCompleted) and event.seq == seq:
            try:
                args, kwargs = msgspec.msgpack.decode(event.args)
            except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
                return None
            parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
            text = "(" + ", ".join(parts) + ")"  # as the call was written: step('o-1', note='x')
            return text if len(text) <= 120 else text[:117] + "..."
        if isinstance(event, (StepFailed, HookReceived)) and event.seq == seq:
            return None  # a failed attempt records a digest, not its arguments; a hook has none
    return None
