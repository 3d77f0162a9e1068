"""The blocking twins' bridge: run a coroutine on an event loop of its own.

``start()``, ``get_run()`` and every other blocking call (and
`werkfluss.testing`'s) run their async twin through `blocking`, which
refuses to run inside an event loop (it would block it) and closes the
connections the call opened before its loop ends.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, TypeVar

import anyio

from ._errors import ConfigurationError
from ._store._open import close_stores

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["blocking"]

T = TypeVar("T")


def blocking(name: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run `call` on an event loop of its own, closing the connections it opened.

    Raises:
        ConfigurationError: called inside a running event loop (naming ``await <name>_async(...)``).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise ConfigurationError(
            f"{name}() cannot be called inside a running event loop; use 'await {name}_async(...)'"
        )

    async def main() -> T:
        try:
            return await call()
        finally:
            with anyio.CancelScope(shield=True):
                await close_stores()

    return anyio.run(main, backend="asyncio")
