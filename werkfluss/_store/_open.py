"""The store for a `Settings`: one `RedisStore` per event loop and settings.

Every caller on the store's side of the layers (the public calls, the
queries, the worker, the command line, `werkfluss.testing`) gets its
connections here, so repeated calls on one event loop reuse them and a
worker's pool carries the writes of the runs it executes. A store is bound
to the loop it was opened on (redis-py's connections are), so the cache is
per loop, and a loop that is gone drops its entry. `close_stores` closes
what the running loop opened: the blocking calls and the command line call
it before their loop ends.
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from . import RedisStore
from ._embedded import ensure_server

if TYPE_CHECKING:
    from .._options import Settings

__all__ = ["close_stores", "open_store"]

_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Settings, RedisStore]] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


async def open_store(settings: Settings) -> RedisStore:
    """The store for `settings` on the running event loop, connecting on first use.

    Raises:
        StorageError: the server is unreachable or unfit (named, its URL redacted).
    """
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
    # Starting the embedded server blocks (a process start, a file lock): off the loop.
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
