"""werkfluss example: an order that pauses twice, and resumes where it was.

    python example.py              fulfil order-1 (or: python example.py order-7)

The workflow charges a flaky payment gateway (werkfluss retries it), then
**pauses**: first for the warehouse (a durable 3 s sleep), then for a
manager's approval (a hook, raced against a deadline). While it is paused
no process needs to hold it: press Ctrl-C and the run stays paused in
./.werkfluss. Approve it from anywhere, then run the same command again:

    werkfluss hooks send approve:order-7 '{"ok": true}'
    python example.py order-7      finished steps come back from the log; the rest executes
    python example.py order-7      the run is complete: its result is printed, nothing executes
    werkfluss runs show order-7    the run's timeline, with its pauses

With nobody at the keyboard (stdin is not a terminal, as in CI) the manager
gets 5 s instead of 120 s, so the run finishes on its own. EXAMPLE_FAIL_RATE
(0 to 1, default 0.4) sets how often the gateway fails.

Everything lives in ./.werkfluss (an embedded Valkey server started on demand;
stop it with `werkfluss server stop`).
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from decimal import Decimal

from werkfluss import (
    RetryPolicy,
    RunInfo,
    RunNotFoundError,
    StepFailedError,
    WerkflussError,
    get_run,
    hook,
    race,
    sleep,
    start,
    step,
    step_key,
    workflow,
)

# A person at a terminal gets two minutes to approve; an unattended run (CI, a pipe) 5 s.
ATTENDED = sys.stdin is not None and sys.stdin.isatty()
APPROVAL_WINDOW = 120.0 if ATTENDED else 5.0
# Longer than ~2 s, so the run pauses (a shorter sleep simply waits in memory).
WAREHOUSE_WAIT = 3.0


@dataclass
class Order:
    id: str
    email: str
    total: Decimal
    approval_window: float  # seconds the manager has; after that it ships without them


@dataclass
class Approval:
    """The manager's answer, delivered to the hook: {"ok": true} or {"ok": false}."""

    ok: bool


@step
async def fetch_order(order_id: str) -> Order:
    print(f"  · fetching {order_id} from the shop database")
    # The approval window is part of the recorded order: a replay waits for the same one.
    return Order(order_id, f"{order_id}@example.com", Decimal("42.50"), APPROVAL_WINDOW)


# The payment gateway is flaky: each attempt fails with probability FAIL_RATE,
# and werkfluss retries with backoff. step_key() is the idempotency key a real
# gateway would deduplicate on, so a retried charge never charges twice.
FAIL_RATE = float(os.environ.get("EXAMPLE_FAIL_RATE", "0.4"))


@step(retries=RetryPolicy(retries=5, base=0.1))
async def charge_card(order: Order) -> str:
    print(f"  · charging {order.total} (idempotency key {step_key()})")
    if random.random() < FAIL_RATE:
        raise ConnectionError("payment gateway timed out")
    return f"receipt-{order.id}"


@step
async def pack_parcels(order: Order) -> int:
    print(f"  · packing {order.id}: 3 parcels")
    return 3


@step
async def send_confirmation(order: Order, receipt: str, parcels: int, approved: str) -> None:
    print(f"  · mailing {order.email}: {receipt}, {parcels} parcels, {approved}")


@step
async def refund(order: Order, receipt: str) -> None:
    print(f"  · refunding {order.total} ({receipt})")


@workflow
async def fulfil_order(order_id: str) -> str:
    order = await fetch_order(order_id)
    receipt = await charge_card(order)
    await sleep(WAREHOUSE_WAIT)  # durable: the run pauses, and resumes when it is due
    parcels = await pack_parcels(order)
    # The manager's approval, or the end of the window, whichever comes first.
    winner, answer = await race(hook(token=f"approve:{order_id}", type=Approval), sleep(order.approval_window))
    if winner == 0 and not answer.ok:
        await refund(order, receipt)
        return f"{order_id} declined by the manager: {receipt} refunded"
    approved = "approved by the manager" if winner == 0 else f"no answer in {order.approval_window:g} s, shipped anyway"
    await send_confirmation(order, receipt, parcels, approved)
    return f"{order_id} shipped in {parcels} parcels ({receipt}), {approved}"


# Where each step stands in the run, for the progress display. refund and
# send_confirmation are the two ways the run ends.
STEPS = {"fetch_order": 1, "charge_card": 2, "pack_parcels": 3, "send_confirmation": 4, "refund": 4}
TOTAL = 4


def approve_commands(order_id: str) -> tuple[str, str]:
    """The two ways to approve the order from another terminal: the command line and Python."""
    token = f"approve:{order_id}"
    return (
        f"werkfluss hooks send {token} '{{\"ok\": true}}'",
        f"python -c \"from werkfluss import invoke_hook; invoke_hook('{token}', {{'ok': True}})\"",
    )


class _Progress(logging.Handler):
    """Shows where the run is, from the structured fields of werkfluss's log records:
    each step executed now or replayed from the log, retries, and pauses."""

    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id
        self.last = ""  # the last step the run got past, to tell its two pauses apart
        self.attempts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.show(record)
        except Exception:
            self.handleError(record)  # as logging's own handlers do: never into the workflow

    def show(self, record: logging.LogRecord) -> None:
        event = getattr(record, "werkfluss_event", None)
        name = str(getattr(record, "werkfluss_step", "")).rsplit(":", 1)[-1]
        at = f"[{STEPS.get(name, '?')}/{TOTAL}]"  # the step's place in the run, also while it retries
        if event == "step.executed":
            self.last = name
            print(f"  {at} ✓ {name}: executed")
        elif event == "step.replayed":
            self.last = name
            print(f"  {at} ↺ {name}: replayed from the log, not executed again")
        elif event == "step.retrying":
            self.attempts[name] = self.attempts.get(name, 0) + 1
            print(f"  {at} ⟳ {name}: attempt {self.attempts[name]} failed, retrying")
        elif event == "step.failed":
            print(f"  {at} ✗ {name}: failed for good")
        elif event == "hook.received":
            print(f"  · the manager's answer arrived (hook approve:{self.order_id})")
        elif event == "run.paused":
            self.paused()
        elif event == "run.failed":
            pass  # main() says what failed and how to resume it
        elif record.levelno >= logging.INFO:
            print(f"[werkfluss] {record.getMessage()}")

    def paused(self) -> None:
        rerun = f"python example.py {self.order_id}"
        if self.last != "pack_parcels":
            print(f"  ⏸ paused for {WAREHOUSE_WAIT:g} s: the warehouse is picking the order (a durable sleep).")
            print(f"    No process needs to wait: press Ctrl-C now, and `{rerun}` resumes the run later.")
            return
        cli, python = approve_commands(self.order_id)
        nobody = " (nobody at the keyboard: stdin is not a terminal)" if not ATTENDED else ""
        print(f"  ⏸ paused, waiting for the manager's approval: hook approve:{self.order_id}.")
        print(f"    Without an answer it ships anyway in {APPROVAL_WINDOW:g} s{nobody}.")
        print("    From another terminal, in this directory, approve it (`false` declines it):")
        print(f"      {cli}")
        print("    or the same in Python:")
        print(f"      {python}")
        print("    and see the pause in the run's timeline:")
        print(f"      werkfluss runs show {self.order_id}")
        print(f"    Or press Ctrl-C: the run stays paused; approve it, then run `{rerun}`.")


def where(order_id: str) -> RunInfo | None:
    """The run's state in storage, or None if there is no such run yet."""
    try:
        return get_run(order_id)
    except RunNotFoundError:
        return None


def waits_of(run: RunInfo) -> str:
    """What a paused run of this example waits for, in its own words."""
    hooked = any(wait.kind == "hook" for wait in run.waiting)
    parts = []
    for wait in run.waiting:
        if wait.kind == "hook":
            parts.append(f"the manager's approval (hook {wait.token})")
        elif wait.kind == "timer" and wait.due is not None:
            what = "the end of the approval window" if hooked else "the warehouse"
            parts.append(f"{what} at {wait.due:%H:%M:%S} UTC")
    return " or ".join(parts) or "something"


def headline(order_id: str, run: RunInfo | None) -> str:
    """What this invocation is about to do, by the run's state in storage."""
    if run is None:
        return (
            f"{order_id} is a new order: {TOTAL} steps, a pause for the warehouse ({WAREHOUSE_WAIT:g} s) "
            f"and one for the manager's approval (up to {APPROVAL_WINDOW:g} s)."
        )
    if run.status == "completed":
        return f"{order_id} is complete: printing its recorded result, nothing executes."
    if run.status == "paused":
        return f"{order_id} is paused, waiting for {waits_of(run)}. Resuming it: its log is replayed."
    if run.status == "failed":
        return f"{order_id} failed at {run.last_step}. Resuming it there, with fresh retries."
    if run.status == "running":
        return f"{order_id} was interrupted mid-step. Resuming it (or waiting, if another process runs it)."
    return f"{order_id} is {run.status}."


def after_ctrl_c(order_id: str) -> str:
    """What Ctrl-C left in storage, and how to go on."""
    rerun = f"python example.py {order_id}"
    try:
        run = where(order_id)
    except (WerkflussError, KeyboardInterrupt):
        return f"stopped: run `{rerun}` to resume where it stopped"
    if run is not None and run.status == "paused":
        lines = [f"stopped. {order_id} stays paused in storage, waiting for {waits_of(run)}; no process holds it."]
        if any(wait.kind == "hook" for wait in run.waiting):
            lines.append(f"  approve it:    {approve_commands(order_id)[0]}")
        lines.append(f"  see the pause: werkfluss runs show {order_id}")
        lines.append(f"  resume it:     {rerun}")
        return "\n".join(lines)
    if run is not None and run.status == "running":
        return f"interrupted in the middle of a step: run `{rerun}` to resume; finished steps are replayed"
    return f"stopped: run `{rerun}` to go on"


def main() -> None:
    order_id = sys.argv[1] if len(sys.argv) > 1 else "order-1"
    logger = logging.getLogger("werkfluss")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(_Progress(order_id))
    try:
        print(headline(order_id, where(order_id)))
        # The order ID names the run, so `werkfluss runs show order-1` finds it.
        result = start(fulfil_order.options(run_id=order_id), order_id)
    except KeyboardInterrupt:
        print("\n" + after_ctrl_c(order_id))
        sys.exit(130)
    except StepFailedError as exc:
        # One line, not a traceback: what failed, and how to go on.
        name = exc.step_id.rsplit(":", 1)[-1]
        why = f"{exc.error_type}: {exc.error_message}".splitlines()[0]
        again = f"python example.py {order_id}"
        if FAIL_RATE >= 1:
            again = f"EXAMPLE_FAIL_RATE=0 {again}"
        print(
            f"{order_id} failed: {name} gave up after {exc.attempts} attempts ({why}). Resume it: {again}",
            file=sys.stderr,
        )
        sys.exit(1)
    except WerkflussError as exc:
        print(f"{order_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    print(result)
    print(f"its timeline: werkfluss runs show {order_id}")
    other = f"order-{random.randint(2, 99)}"
    print(f"run it again: nothing executes, the recorded result comes back (or try `python example.py {other}`)")


if __name__ == "__main__":
    main()
