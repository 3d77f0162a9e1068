"""The storage boundary: every Redis key and script of werkfluss, behind one `RedisStore`.

`RedisStore` is composed of one class per family of keys, each in its own
module with the Lua it sends, and all on one connection (`_connect`):

- `_runs`: a run's writes (``P{R}:state``, ``:log``, ``:steps``, the run index);
  `_run_reads`: what those keys hold;
- `_hooks`: a hook token's mailbox (``P{hook:T}:...``);
- `_timers` and `_queue`: the shared queue, its timers and dead letters (``P{q}:...``).

Each family is one Redis Cluster hash slot per run, token or queue, and a
script never touches two families, so each is atomic on a cluster too. The
key layout and every state field are in `_keys`; the fast lane, the store's
own path for hot commands, in `_lane`. Every run write first compares the
run's epoch (fencing) and is idempotent where redis-py may re-send it.
"""

from __future__ import annotations

from . import _hooks, _queue, _runs, _timers
from ._connect import CALL_DEADLINE, SOCKET_TIMEOUT, Script
from ._hooks import RedisHooks
from ._keys import RunState
from ._queue import RedisQueue
from ._run_reads import RedisRunReads
from ._runs import AcquireResult, RedisRuns
from ._timers import RedisTimers

__all__ = ["CALL_DEADLINE", "SCRIPTS", "SOCKET_TIMEOUT", "AcquireResult", "RedisStore", "RunState", "Script"]

SCRIPTS: tuple[Script, ...] = (*_runs.SCRIPTS, *_hooks.SCRIPTS, *_timers.SCRIPTS, *_queue.SCRIPTS)
"""Every Lua script the store runs, by family (for tools naming an ``EVALSHA`` by its SHA)."""


class RedisStore(RedisRuns, RedisRunReads, RedisHooks, RedisTimers, RedisQueue):
    """The run log and run state, hooks, timers and the queue on one Redis/Valkey server or one Redis Cluster.

    Connect with `RedisStore.connect`; on a cluster every script's keys share
    one hash slot, so the same calls work on both kinds of client.
    """
