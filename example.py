"""werkfluss example: fulfil an order in four durable steps.

Run it:            python example.py            (or: python example.py order-7)
Interrupt it:      press Ctrl-C while "reserving stock" waits, or kill it
Run it again:      finished steps come back from the log; only the rest executes
Run it once more:  the run is complete; its result is printed, nothing executes

Everything lives in ./.werkfluss (an embedded Valkey server started on demand;
stop it with `python -m werkfluss server stop`).
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from decimal import Decimal

import anyio

from werkfluss import RetryPolicy, start, step, step_key, workflow


@dataclass
class Order:
    id: str
    email: str
    total: Decimal


@step
async def fetch_order(order_id: str) -> Order:
    print(f"  · fetching {order_id} from the shop database")
    return Order(order_id, f"{order_id}@example.com", Decimal("42.50"))


# The payment gateway is flaky: each attempt fails with probability FAIL_RATE,
# and werkfluss retries with backoff. step_key() is the idempotency key a real
# gateway would deduplicate on, so a retried charge never charges twice.
FAIL_RATE = float(os.environ.get("EXAMPLE_FAIL_RATE", "0.4"))


@step(retries=RetryPolicy(retries=5, base=0.2))
async def charge_card(order: Order) -> str:
    print(f"  · charging {order.total} (idempotency key {step_key()})")
    if random.random() < FAIL_RATE:
        raise ConnectionError("payment gateway timed out")
    return f"receipt-{order.id}"


@step
async def reserve_stock(order: Order) -> int:
    seconds = float(os.environ.get("EXAMPLE_PAUSE", "3"))
    print(f"  · reserving stock… ({seconds:g} s: press Ctrl-C now, then run again)")
    await anyio.sleep(seconds)
    return 3


@step
async def send_confirmation(order: Order, receipt: str, parcels: int) -> None:
    print(f"  · mailing {order.email}: {receipt}, {parcels} parcels")


@workflow
async def fulfil_order(order_id: str) -> str:
    order = await fetch_order(order_id)
    receipt = await charge_card(order)
    parcels = await reserve_stock(order)
    await send_confirmation(order, receipt, parcels)
    return f"{order.id} shipped in {parcels} parcels ({receipt})"


STEPS = 4  # fetch_order, charge_card, reserve_stock, send_confirmation


class _Progress(logging.Handler):
    """Shows where the run is, from the structured fields of werkfluss's log records:
    steps done out of STEPS, each executed now or replayed from the log."""

    def __init__(self) -> None:
        super().__init__()
        self.done = 0

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "werkfluss_event", None)
        name = str(getattr(record, "werkfluss_step", "")).rsplit(":", 1)[-1]
        if event in ("step.executed", "step.replayed"):
            self.done += 1
            how = "executed" if event == "step.executed" else "replayed from the log"
            mark = "✓" if event == "step.executed" else "↺"
            print(f"  [{self.done}/{STEPS}] {mark} {name}: {how}")
        elif event == "step.retrying":
            print(f"  [{self.done}/{STEPS}] ⟳ {name}: attempt failed, retrying")
        elif record.levelno >= logging.INFO:
            print(f"[werkfluss] {record.getMessage()}")


def main() -> None:
    order_id = sys.argv[1] if len(sys.argv) > 1 else "order-1"
    logger = logging.getLogger("werkfluss")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(_Progress())
    print(f"fulfilling {order_id} ({STEPS} steps):")
    try:
        # The order ID names the run, so `python -m werkfluss runs show order-1` finds it.
        print(start(fulfil_order.options(run_id=order_id), order_id))
    except KeyboardInterrupt:
        print("\ninterrupted: run `python example.py` again to resume where it stopped")
        sys.exit(130)
    other = f"order-{random.randint(2, 99)}"
    print(f"its timeline: python -m werkfluss runs show {order_id}")
    print(f"run it again: nothing executes, the recorded result comes back (or try `python example.py {other}`)")


if __name__ == "__main__":
    main()
