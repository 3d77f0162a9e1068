"""Helpers for your test suite: replay checks for code changes, and a throwaway server.

**Replay checks.** Before deploying a change to a workflow, check that the
new code still replays the runs the old code recorded::

    from werkfluss.testing import assert_replays

    def test_checkout_still_replays_production_runs() -> None:
        for run_id in ["order-7", "order-8"]:
            assert_replays(checkout, run_id)

`check_replay` runs the workflow body against the run's log without
executing any step: the engine's own executor, told to stop where the
recorded history ends instead of going on live, hands back the recorded
results (a step appended at the end is compatible). It
reports the first divergence: the sequence number, the step the log
recorded there and the step the code now calls. Runs can also be checked
offline from saved events (``events=`` a list from `werkfluss.get_events`).

**The pre-deploy check.** `check_deploy(module)` (``werkfluss check MODULE``)
replays every in-flight run of the module's workflows the same way and says
which would block on this code: a divergence, or a recorded result that no
longer decodes to its step's annotation (`DeployCheck.ok`, `DeployCheck.blocking`)::

    def test_the_deploy_blocks_no_run() -> None:
        report = check_deploy("app.flows")
        assert report.ok, [v.describe() for v in report.blocking]

**A throwaway server.** With pytest, werkfluss's plugin (loaded when
werkfluss is installed) gives two fixtures: ``werkfluss_server``, an
embedded Valkey server in a temporary directory for the whole session,
and ``werkfluss_settings``, `Settings` with a fresh key prefix per test,
also set as the environment's default so plain ``start(...)`` calls use
it. Without pytest, `throwaway_server()` is the same as a context manager.

**A test clock.** `TestClock` moves the clock timers are due by ahead, so
that a test of a workflow that sleeps for a week takes milliseconds, on the
same server: by itself whenever nothing else goes on (auto mode, the
``werkfluss_clock`` fixture), or when the test says (``advance("7d")``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._check import (
    DeployCheck,
    Mismatch,
    RunVerdict,
    SchemaProblem,
    check_deploy,
    check_deploy_async,
    first_mismatch,
    iter_check_async,
)
from ._engine._executor import Body, RunExecutor
from ._engine._replay import Replay
from ._errors import ConfigurationError
from ._events import RunFailed, RunStarted
from ._queries import get_events_async
from ._store._embedded import throwaway_server
from ._sync import blocking
from ._test_clock import TestClock

if TYPE_CHECKING:
    from ._events import AnyEvent
    from ._options import Settings
    from ._wrappers import Workflow

__all__ = [
    "DeployCheck",
    "Divergence",
    "Mismatch",
    "ReplayCheck",
    "RunVerdict",
    "SchemaProblem",
    "TestClock",
    "assert_replays",
    "check_deploy",
    "check_deploy_async",
    "check_replay",
    "check_replay_async",
    "iter_check_async",
    "throwaway_server",
]


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where the current code stops matching a recorded run.

    Attributes:
        seq: The sequence number of the first mismatch (None when the
            mismatch is the workflow's outcome rather than a call).
        recorded: What the log recorded there (a step ID, ``hook:<token>``,
            ``sleep``, ``race``), or ``"nothing"``.
        current: What the current code calls there, or what it did instead.
        message: All of it in one sentence.
    """

    seq: int | None
    recorded: str
    current: str
    message: str


@dataclass(frozen=True, slots=True)
class ReplayCheck:
    """The outcome of `check_replay`.

    Attributes:
        run_id: The run checked.
        replayed: How many recorded calls the current code made again, in order.
        divergence: The first mismatch, or None when the code replays the run.
        patches: The branch each ``patched(name)`` took on this replay (True: the
            new one; a run that has not reached it yet would take the new one).
    """

    run_id: str
    replayed: int
    divergence: Divergence | None
    patches: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the current code replays the recorded run."""
        return self.divergence is None


async def check_replay_async(
    workflow: Workflow[Any, Any],
    run_id: str,
    *,
    events: list[AnyEvent] | None = None,
    settings: Settings | None = None,
) -> ReplayCheck:
    """Replay run `run_id`'s log against `workflow`'s current code; execute no step.

    Args:
        workflow: The workflow as the code defines it now.
        run_id: The recorded run (hooks without a token are named after it).
        events: The run's events, to check offline; default: read its log
            from the store `settings` point to.
        settings: Where the log lives (default: `Settings.from_env()`).

    Raises:
        ConfigurationError: the log has no start, or it is another workflow's run.
        RunNotFoundError: there is no run `run_id` (when reading the store).
    """
    if events is None:
        events = await get_events_async(run_id, settings=settings)
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    if started is None:
        raise ConfigurationError(f"run {run_id!r}: the log has no run-started event to replay from")
    if started.workflow != workflow.id:
        raise ConfigurationError(f"run {run_id!r} is a run of workflow {started.workflow!r}, not {workflow.id!r}")
    replay = Replay()
    for index, event in enumerate(events, 1):
        replay.add(index, event)
    args, kwargs = workflow.decode_call(started.args)
    # The real executor, stopping where the recorded history ends instead of going on live.
    checker = RunExecutor.replayer(workflow, run_id, replay)
    outcome = await checker.replay_body(args, kwargs)
    failed = next((e for e in reversed(events) if isinstance(e, RunFailed)), None)
    reached = len(checker.reached or ())
    return ReplayCheck(run_id, reached, _divergence(checker, outcome, failed), dict(checker.patches))


def check_replay(
    workflow: Workflow[Any, Any],
    run_id: str,
    *,
    events: list[AnyEvent] | None = None,
    settings: Settings | None = None,
) -> ReplayCheck:
    """Blocking twin of `check_replay_async`."""
    return blocking("check_replay", lambda: check_replay_async(workflow, run_id, events=events, settings=settings))


def assert_replays(
    workflow: Workflow[Any, Any],
    run_id: str,
    *,
    events: list[AnyEvent] | None = None,
    settings: Settings | None = None,
) -> ReplayCheck:
    """`check_replay`, raising `AssertionError` with the divergence's message if there is one."""
    result = check_replay(workflow, run_id, events=events, settings=settings)
    if result.divergence is not None:
        raise AssertionError(result.divergence.message)
    return result


def _divergence(checker: RunExecutor, outcome: Body, failed: RunFailed | None) -> Divergence | None:
    """The first mismatch a `RunExecutor.replayer` found between the code and the log (`first_mismatch`)."""
    found = first_mismatch(checker, outcome, failed)
    if found is None:
        return None
    current = f"nothing: the workflow {found.did}" if found.kind == "missing" else found.did
    return Divergence(found.seq, found.recorded, current, found.message)


try:
    # Still importable from here, and `-p werkfluss.testing` / ``pytest_plugins`` still register
    # them; the entry point loads the light `_pytest_plugin` itself.
    from ._pytest_plugin import werkfluss_clock as werkfluss_clock
    from ._pytest_plugin import werkfluss_server as werkfluss_server
    from ._pytest_plugin import werkfluss_settings as werkfluss_settings
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pass
