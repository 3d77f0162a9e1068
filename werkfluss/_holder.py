"""Who holds a run: a holder name per executing caller, and liveness checks.

A holder is ``<host key>/<pid>/<nonce>.<n>``: one per caller that executes
runs (a `start`, a parent driving a child, a worker taking a message),
never shared. The host key distinguishes machines *and* PID namespaces
(containers share a kernel but not PIDs), so that a rerun on the same host
can tell at once that the process holding a run is gone and take it over,
instead of sitting out the lease. Within this process, the registry of
live holdings tells a caller that has finished (or died with its thread)
from one still executing: a second caller here waits for that one instead
of taking the run over in the middle of a step.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["Holding", "holder_is_dead", "holder_prefix", "holding", "live_holding", "process_holder"]

_cache: tuple[int, str] | None = None
_lock = threading.Lock()
_live: dict[str, Holding] = {}  # holder -> its holding, for every caller in this process that holds or waits
_numbers = itertools.count(1)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _host_key() -> str:
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    raw = "|".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pidns))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def process_holder() -> str:
    """This process's name, ``<host key>/<pid>/<nonce>`` (recomputed after a fork).

    Workers use it as their consumer name; runs are held under `holding` names.
    """
    global _cache
    pid = os.getpid()
    if _cache is None or _cache[0] != pid:
        _cache = (pid, f"{_host_key()}/{pid}/{uuid.uuid4().hex[:12]}")
    return _cache[1]


def holder_prefix() -> str:
    """How every holder name of this process begins."""
    return process_holder() + "."


class Holding:
    """One caller's claim on a run in this process: a holder name of its own,
    registered from before it acquires the run until it is done with it.

    Thread-safe: callers on other threads (each `start()` runs its own event
    loop) look holdings up, wait for them, and cancel their executors.
    """

    __slots__ = ("_ended", "_loop", "_waiters", "executor", "generation", "holder", "run_id")

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.holder = f"{holder_prefix()}{next(_numbers)}"
        self.executor: Any = None  # the RunExecutor executing the run for this caller, while one does
        self.generation = 0  # moves whenever this caller stops executing the run
        self._ended = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def __enter__(self) -> Holding:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        with _lock:
            _live[self.holder] = self
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with _lock:
            _live.pop(self.holder, None)
            self._ended = True
        self.stopped()

    def executing(self, executor: Any) -> None:
        """`executor` executes the run for this caller from now on."""
        self.executor = executor

    def stopped(self) -> None:
        """This caller stopped executing the run (ended, paused, lost or handed it back): wake the waiters."""
        with _lock:
            self.executor = None
            self.generation += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:
                pass  # that loop is closed: nobody waits there any more

    async def wait(self, generation: int, seconds: float) -> None:
        """Wait until this caller stops executing (`generation` moved on) or ends, at most `seconds`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with _lock:
            if self._ended or self.generation != generation:
                return
            self._waiters.append((loop, future))
        try:
            await asyncio.wait((future,), timeout=seconds)
        finally:
            with _lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))

    def call(self, fn: Callable[[], object]) -> None:
        """Call `fn` on this caller's event loop (at once if that is the running one)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or self._loop is running:
            fn()
            return
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # its loop has closed: the run stopped with it


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def holding(run_id: str) -> Holding:
    """A new holder name for one caller of run `run_id`; use it as a context manager
    (``with holding(run_id) as h:``) around everything the caller does with the run."""
    return Holding(run_id)


def live_holding(holder: str) -> Holding | None:
    """The live holding of `holder` in this process, if it is one."""
    with _lock:
        return _live.get(holder)


def holder_is_dead(holder: str) -> bool:
    """True only when `holder` is provably gone: same host key, and its PID has
    no live process (or a zombie), or it is this process's and no caller here
    holds under that name any more."""
    parts = holder.split("/")
    if len(parts) != 3 or parts[0] != _host_key() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return live_holding(holder) is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    stat = _read(f"/proc/{pid}/stat")
    # Field 3 is the state; a zombie has exited and only waits to be reaped.
    return bool(stat) and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]
