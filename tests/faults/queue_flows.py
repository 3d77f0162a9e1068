"""The workflow of the queue-limit crash scenario (``werkfluss worker tests.faults.queue_flows``).

`limited` is a queue of global concurrency `LIMIT`; each run of `held` executes one step,
`occupy`, which holds for the time it is given. Each execution of the step writes a
``start <step key> <pid> <unix time>`` entry to the list ``<prefix>queue-ledger`` on the
store before it does its work, and ``end <step key> <pid> <unix time>`` after it: the
runs' own ledger of what executed when. An execution of a worker that was SIGKILLed has
no ``end``; the test ends it at the kill.

It imports `tests.faults.flows`, so worker processes also get that module's file ledger
(``exec`` rows, checked by `Faults.check`) and its store instrumentation.
"""

from __future__ import annotations

import os
import time

import anyio

from werkfluss import Queue, Settings, step, step_key, workflow
from werkfluss._store._open import open_store

from .flows import work

__all__ = ["LEDGER", "LIMIT", "held", "limited", "occupy"]

LIMIT = 5
LEDGER = "queue-ledger"  # under the prefix: one list, so one slot on a cluster too

limited = Queue("f-limited", concurrency=LIMIT)


async def note(kind: str, key: str) -> None:
    """Append one entry to the store's ledger list; returns once the server has it."""
    settings = Settings.from_env()
    store = await open_store(settings)
    await store.client.rpush(settings.prefix + LEDGER, f"{kind} {key} {os.getpid()} {time.time():.6f}")


@step(name="faults:occupy")
async def occupy(n: int, seconds: float) -> int:
    key = step_key()
    await work(key)
    # Its work starts only once the start is on the server: a kill before that leaves no
    # entry, and no work either.
    await note("start", key)
    await anyio.sleep(seconds)
    await note("end", key)
    return n


@workflow(name="faults:held", queue=limited)
async def held(n: int, seconds: float) -> int:
    return await occupy(n, seconds)
