"""Patch markers in a run's body: which branch of ``if patched(name)`` a run takes, the
same on every replay as when it first got there.

A marker takes no sequence number: a run recorded before the patch has none in its
log, and the calls after the ``if`` must keep the numbers they were recorded with.
The marker records instead the number of the call that follows it. The decision:

- the log has a marker for the name: the new branch;
- the log has calls at or after this point (steps, timers, hooks, races, or a hook
  or child run the run paused on): the run passed here on the old code, the old branch;
- nothing recorded from here on: the new branch, and the marker is recorded before
  anything after it is, so a replay finds it.

The first decision for a name holds for the rest of the execution (a patch in a loop
does not switch a run from the old branch to the new one halfway), as Temporal does.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from .._errors import NonDeterminismError
from .._events import AnyEvent, PatchMarked
from .._ids import child_run_id
from ._run import RunBase

__all__ = ["PatchCalls"]


class PatchCalls(RunBase):
    """``patched()`` and ``deprecate_patch()`` of a run's body, and the markers they record.

    `patches` holds the decisions this execution made, by patch name (True: the new
    branch); a replay check (`RunExecutor.replayer`) reports them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.patches: dict[str, bool] = {}
        self._marks: list[PatchMarked] = []  # decided, not yet in the log
        self._marking: anyio.Lock | None = None
        # Patches deprecated at a point this run's log goes past without their marker:
        # (name, seq). A divergence after one says the old branch may still be needed.
        self._deprecated: list[tuple[str, int]] = []

    def patched(self, name: str, seq: int) -> bool:
        """Whether the body takes patch `name`'s new branch, reached before call `seq`."""
        decided = self.patches.get(name)
        if decided is None:
            if name in self.replay.patches:
                decided = True
            elif self._passed(seq):
                decided = False
            else:
                decided = True
                if self.live:
                    self._marks.append(PatchMarked(time.time(), name, seq))
            self.patches[name] = decided
        return decided

    def deprecate_patch(self, name: str, seq: int) -> None:
        """Patch `name`'s old branch is gone: record nothing, but remember a run that may
        have needed it, so that its divergence says so."""
        if name not in self.replay.patches and self._passed(seq):
            self._deprecated.append((name, seq))

    def _passed(self, seq: int) -> bool:
        """The log has a call at or after `seq`, or the run paused on one."""
        if any(recorded >= seq for recorded in self.replay.labels):
            return True
        # A hook not yet received or a child not yet ended is recorded only later, but
        # its default token or child ID carries its seq: taking the new branch would
        # renumber it, and the run would wait on a token nobody delivers to.
        for wait in self.replay.waits:
            waited: int | None = None
            if wait.kind == "hook" and wait.token is not None:
                waited = _suffix(wait.token, f"{self.run_id}:")
            elif wait.kind == "child" and wait.run is not None:
                waited = _suffix(wait.run, f"{self.run_id}/")
                if waited is not None and child_run_id(self.run_id, waited) != wait.run:
                    waited = None
            if waited is not None and waited >= seq:
                return True
        return False

    async def record(self, dedup: str, event: AnyEvent) -> None:
        """Append one event to the log, after the markers decided before it."""
        if self._marks:
            await self.flush_marks()
        await super().record(dedup, event)

    async def flush_marks(self) -> None:
        """Record the markers decided so far: before anything after them, a pause or the run's end."""
        if not self._marks:
            return
        if self._marking is None:
            self._marking = anyio.Lock()
        # Parallel branches may record at once: each waits until the markers are in.
        async with self._marking:
            while self._marks:
                mark = self._marks[0]
                await super().record(f"p{mark.seq}:{mark.name}", mark)
                self._marks.pop(0)

    def check(self, seq: int, label: str) -> None:
        """`RunBase.check`, naming a patch deprecated too early in the divergence."""
        try:
            super().check(seq, label)
        except NonDeterminismError as exc:
            raise self._explained(exc) from None

    def check_args(
        self,
        seq: int,
        label: str,
        digest: bytes | None,
        recorded: bytes | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """`RunBase.check_args`, naming a patch deprecated too early in the divergence."""
        try:
            super().check_args(seq, label, digest, recorded, args, kwargs)
        except NonDeterminismError as exc:
            raise self._explained(exc) from None

    def _explained(self, exc: NonDeterminismError) -> NonDeterminismError:
        if exc.hint or exc is not self.diverged:
            return exc
        stale = [name for name, at in self._deprecated if at <= exc.seq]
        if not stale:
            return exc
        name = stale[0]
        hint = (
            f"This run has no marker of patch {name!r} and its log goes past deprecate_patch({name!r}): "
            f"it passed there before the patch, on the old branch, which was deleted too early. Put back "
            f"`if patched({name!r}): <new branch> else: <old branch>` until no run of the old branch is left."
        )
        self.diverged = NonDeterminismError(
            exc.run_id, exc.seq, exc.recorded, exc.called, arguments=exc.arguments, hint=hint
        )
        return self.diverged


def _suffix(text: str, prefix: str) -> int | None:
    """The number after `prefix` in `text`, if `text` is `prefix` and digits."""
    rest = text[len(prefix) :] if text.startswith(prefix) else ""
    return int(rest) if rest.isdigit() and rest.isascii() else None
