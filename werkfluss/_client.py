"""What a script calls: `start()` and `start_async()`, and the connections behind them.

One `RedisStore` is kept per event loop and settings, so repeated
`start_async` calls reuse their connections; `start()` runs its own event
loop and closes what it opened before returning.
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread

from ._embedded import ensure_server
from ._events import encode_call
from ._ids import derive_run_id
from ._options import Settings
from ._runtime import run_workflow
from ._store import RedisStore

if TYPE_CHECKING:
    from ._wrappers import Workflow

__all__ = ["close_stores", "open_store", "start", "start_async"]

P = ParamSpec("P")
R = TypeVar("R")

_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Settings, RedisStore]] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
# Runs executing in this process, so that concurrent starts of one run share
# one execution instead of fencing each other out.
_active: dict[tuple[int, str], asyncio.Future[Any]] = {}


async def open_store(settings: Settings) -> RedisStore:
    """The store for `settings` on the running event loop, connecting on first use."""
    loop = asyncio.get_running_loop()
    per_loop = _stores.setdefault(loop, {})
    store = per_loop.get(settings)
    if store is not None:
        return store
    async with _locks.setdefault(loop, asyncio.Lock()):
        store = per_loop.get(settings)
        if store is None:
            store = await _connect(settings)
            per_loop[settings] = store
    return store


async def _connect(settings: Settings) -> RedisStore:
    if settings.redis_url is not None:
        return await RedisStore.connect(prefix=settings.prefix, url=settings.redis_url)
    server = await anyio.to_thread.run_sync(
        lambda: ensure_server(Path(settings.directory).resolve(), fsync=settings.fsync)
    )
    return await RedisStore.connect(
        prefix=settings.prefix, unix_socket=str(server.socket_path), password=server.password
    )


async def close_stores() -> None:
    """Close every store opened on the running event loop."""
    for store in _stores.pop(asyncio.get_running_loop(), {}).values():
        await store.close()


async def start_async(workflow: Workflow[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Start or attach to a run of `workflow` and return its result.

    The run ID is ``workflow.options(run_id=...)``'s, or derived from the
    workflow ID and the arguments, so the same call reaches the same run:
    a completed run returns its recorded result without executing
    anything; an interrupted or failed one resumes, executing only the
    steps that did not complete.

    Raises:
        StepFailedError: a step exhausted its retries and the workflow did not catch it.
        NonDeterminismError: the code no longer matches the run's log; the run is blocked.
        RunFailedError: the run failed in another process while this one waited for it.
        SerializationError: an argument or result cannot be stored.
        StorageError: Redis/Valkey is unreachable.
    """
    settings = workflow.run_options.settings or Settings.from_env()
    args_raw = encode_call(workflow.id, args, kwargs, deterministic=True)
    run_id = workflow.run_options.run_id or derive_run_id(workflow.id, args_raw)
    store = await open_store(settings)
    key = (id(store), run_id)
    running = _active.get(key)
    if running is not None:
        result: R = await asyncio.shield(running)
        return result
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _active[key] = future
    try:
        result = await run_workflow(store, workflow, run_id, args, kwargs, args_raw, settings.lease)
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # mark retrieved: nobody else may be waiting
        raise
    else:
        future.set_result(result)
        return result
    finally:
        del _active[key]


def start(workflow: Workflow[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Start or attach to a run of `workflow` from synchronous code; return its result.

    The blocking twin of `start_async`, for scripts; it runs its own event
    loop, so it cannot be called from inside one.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("start() cannot be called inside a running event loop; use 'await start_async(...)'")

    async def main() -> R:
        try:
            return await start_async(workflow, *args, **kwargs)
        finally:
            with anyio.CancelScope(shield=True):
                await close_stores()

    return anyio.run(main, backend="asyncio")
