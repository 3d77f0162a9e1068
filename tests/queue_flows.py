"""Workflows on declared queues for worker processes in tests/test_queues.py
(``werkfluss worker tests.queue_flows``).

Each execution of `occupy` appends ``start <n> <pid> <time>`` to the ledger file
named by ``WF_LEDGER`` before its body and ``end <n> <pid> <time>`` after it, so a
test sees when each run executed, in which process, even one SIGKILLed midway.

``python -m tests.queue_flows declare NAME CONCURRENCY`` declares ``Queue(NAME,
concurrency=CONCURRENCY)`` and enqueues a run on it: another process whose
declaration of a queue the test's own must meet. It prints the run ID.
"""

from __future__ import annotations

import os
import sys
import time

import anyio

from werkfluss import Queue, enqueue, step, workflow

from .helpers import append_to_ledger

SHARED = Queue("qf-shared", concurrency=3)
"""The queue two worker processes share: at most 3 of its runs execute at once, across both."""


def _note(what: str, n: int) -> None:
    append_to_ledger(f"{what} {n} {os.getpid()} {time.time():.6f}\n")


@step
async def occupy(n: int) -> int:
    """Hold a slot for ``WF_STEP_DELAY`` seconds, noting the start and the end in the ledger."""
    _note("start", n)
    await anyio.sleep(float(os.environ.get("WF_STEP_DELAY", "0.1")))
    _note("end", n)
    return n


@workflow(queue=SHARED)
async def bounded(n: int) -> int:
    """One `occupy` step, on the shared queue."""
    return await occupy(n)


@workflow
async def noted(n: int) -> int:
    """Does nothing: what the ``declare`` command enqueues."""
    return n


def main(argv: list[str]) -> None:
    """``declare NAME CONCURRENCY``: declare the queue, enqueue a run on it, print its ID."""
    command, name, concurrency = argv
    if command != "declare":
        raise SystemExit(f"unknown command {command!r}: use 'declare NAME CONCURRENCY'")
    queue = Queue(name, concurrency=int(concurrency))
    print(enqueue(noted.options(queue=queue), 0))


if __name__ == "__main__":
    main(sys.argv[1:])
