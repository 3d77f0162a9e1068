"""Every key, hash field and stream field werkfluss writes, and a run's state as a type.

Key layout (``P`` is the prefix; ``{R}`` is the run ID, ``{hook:T}`` the hook
token, ``{q}`` a queue, each a Redis Cluster hash tag: the keys of one run, of
one token, and of one queue share a slot each, so one script may touch them).
``{q}`` is the default queue's tag; a declared queue N has ``{q:N}``, or
``{q:N:<i>}`` for each partition i when it has several: every queue part below
exists per tag.

    P{R}:state       hash     the run's state: the fields below, read as `RunState`
    P{R}:log         stream   the run's events, field ``e``; entry ID ``0-<n>`` is event index n
    P{R}:steps       hash     ``c<seq>`` -> index of the step's completion,
                              ``f<seq>:<attempt>`` -> index of a failed attempt
    Pruns            zset     run IDs by creation time (ms)
    P{hook:T}:box    stream   payloads not yet taken, field ``p``
    P{hook:T}:meta   hash     ``owner`` (the run that claimed the token), ``first`` and
                              ``last`` (delivery times, ms)
    P{hook:T}:keys   hash     delivery key -> ``<entry>/<nonce>`` of its payload
    Phooks           zset     tokens with payloads waiting, by last delivery (ms)
    Pqueues          hash     declared queue name -> its partitions
    P{q}:queue       stream   consumer group ``workers``: "run or resume run ``r``", with
                              ``x`` (may resume a failed run) and ``d`` (deliveries before
                              a hand-back)
    P{q}:timers      zset     run -> when to look at it next (ms)
    P{q}:nudge       list     at most one "a timer is due sooner", for a worker's BLPOP
    P{q}:dead        stream   dead letters: ``r``, ``message``, ``deliveries``, ``source``,
                              ``at``, ``reason``
    P{q}:errors      hash     message ID -> the last error a worker hit on it
    P{q}:probation   hash     worker -> the suspect message it runs on probation
    P{q}:sweep       string   which worker sweeps for stuck runs now (expires)
    P{q}:delayed     zset     run -> when its delayed start is due (ms)
    P{q}:delayedx    hash     run -> ``1``: a delayed run that may resume a failed run
    P{q}:config      hash     a declared queue's limits (see `Queue.config`), ``declared``
                              (its spelling), ``seen``, and counters ``seq``, ``turn``,
                              ``ready`` (admitted messages no worker has read)
    P{q}:meta        hash     run -> ``<priority>|<1 if its next admission starts it>|<key>``
    P{q}:wait        hash     run -> ``1`` if it may resume a failed run: runs waiting for admission
    P{q}:k:<key>     zset     the runs of one key waiting for admission, by priority then arrival
    P{q}:ring        zset     keys with a run that may start, by its priority, then their turn
    P{q}:later       zset     keys whose rate window is full -> when it reopens (ms)
    P{q}:active      hash     run -> key: admitted runs, each holding a slot until its message is done
    P{q}:running     hash     key -> its admitted runs
    P{q}:again       hash     run -> retry flag: a wake-up that came while the run held its slot
    P{q}:rate        zset     the queue's starts in the rate window (ms)
    P{q}:rate:<key>  zset     one key's starts in its rate window (ms)
    P{q}:bell        list     at most one "a run may be admitted", for a worker's BLPOP
    P{q}:dedup       hash     deduplication ID -> the run that holds it
    P{q}:dedupof     hash     run -> its deduplication ID
    Pschedules       hash     declared schedule name -> ``""``
    P{s:N}:schedule  hash     schedule N's state (`_schedules`): ``declared`` (JSON), ``seen``
                              (renewed, ms), ``last`` (the last tick handled, ms), ``last_run``,
                              ``last_at``, ``fired``, ``skipped``, ``paused``, ``held`` (a tick
                              waiting for the previous run), ``claim``, ``triggers``, ``t:<n>``

State fields (``P{R}:state``):

    status       pending, running, paused, completed, failed, blocked or cancelled
    workflow     the workflow's ID
    holder       the process executing the run, ``""`` for none
    lease        when the holder's lease runs out (ms, the server's clock)
    epoch        raised at every takeover: a write with an older one is fenced out
    n            the index of the last event in the log
    created      when the run was created (ms)
    updated      when its status or log last changed (ms)
    args         the digest of its arguments (a second start must pass the same)
    parent       the run that started this one as a child, ``""`` for none
    result       the encoded result, once completed
    error        the encoded `ErrorInfo`, once failed or blocked
    cancel       a cancel's reason: pending while running, final once cancelled
    waiting      the encoded waits of a paused run
    failed_seq   the step whose failure failed the run (``""`` for none)
    retry_seq    that step, on the run's retry: it executes again instead of replaying
    retry_index  the log index up to which recorded failures are replayed
    queue        the tag of the queue partition it belongs to (``""``: the default queue)
    due          when its delayed start is due (ms; absent for a run that starts at once)
    deadline     when the run's deadline passes (ms, on the timer clock; absent for none)
    allowed      how long the deadline allowed from the run's creation (ms)
    forked_from  ``<run>@<seq>``: the run whose calls before seq this one replays (`fork_run`)
    forks        the runs forked from this one, space-separated
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import msgspec

from .._events import RunStatus  # noqa: TC001 - msgspec resolves RunState's annotations at run time

if TYPE_CHECKING:
    from collections.abc import Mapping

# The parts of a run's keys: P{R}:<part>.
STATE, LOG, STEPS = "state", "log", "steps"
# The parts of a hook token's keys: P{hook:T}:<part>.
BOX, META, DELIVERY_KEYS = "box", "meta", "keys"
# The parts of the queue's keys: P{q}:<part>.
QUEUE, TIMERS, NUDGE, DEAD, ERRORS, PROBATION, SWEEP = (
    "queue",
    "timers",
    "nudge",
    "dead",
    "errors",
    "probation",
    "sweep",
)
# A queue's flow-control parts (`_flow`): P{q}:<part>, and per key P{q}:k:<key>, P{q}:rate:<key>.
DELAYED, DELAYEDX, CONFIG, META, WAIT, RING, LATER = "delayed", "delayedx", "config", "meta", "wait", "ring", "later"
ACTIVE, RUNNING, AGAIN, RATE, BELL, DEDUP, DEDUPOF = "active", "running", "again", "rate", "bell", "dedup", "dedupof"
KEY_WAITING, KEY_RATE = "k:", "rate:"
DEFAULT_TAG = "q"
# Keys without a hash tag: P<name>.
RUNS, HOOKS, QUEUES, SCHEDULES = "runs", "hooks", "queues", "schedules"
# The part of a schedule's key: P{s:<name>}:<part>.
SCHEDULE = "schedule"
# The workers' consumer group on the queue stream: every worker reads as it, and
# the queue's depth and dead letters are counted against it.
GROUP = "workers"

RUN_PARTS = (STATE, LOG, STEPS)
HOOK_PARTS = (BOX, META, DELIVERY_KEYS)
QUEUE_PARTS = (
    *(QUEUE, TIMERS, NUDGE, DEAD, ERRORS, PROBATION, SWEEP, DELAYED, DELAYEDX, CONFIG, META, WAIT),
    *(RING, LATER, ACTIVE, RUNNING, AGAIN, RATE, BELL, DEDUP, DEDUPOF),
)
SCHEDULE_PARTS = (SCHEDULE,)
UNTAGGED = (RUNS, HOOKS, QUEUES, SCHEDULES)

# Stream entry fields: a log event, a hook payload, a queue message's run, its "may
# resume a failed run" flag and its deliveries before a hand-back.
EVENT, PAYLOAD, RUN, RETRY, DELIVERED = b"e", b"p", "r", "x", "d"
# A hook's meta fields.
OWNER, FIRST, LAST = "owner", "first", "last"
# A dead letter's fields (besides RUN).
MESSAGE, DELIVERIES, SOURCE, AT, REASON = "message", "deliveries", "source", "at", "reason"

# The fields of a run's state hash (see the list above).
STATUS, WORKFLOW, HOLDER, LEASE, EPOCH, N = "status", "workflow", "holder", "lease", "epoch", "n"
CREATED, UPDATED, ARGS, PARENT = "created", "updated", "args", "parent"
RESULT, ERROR, CANCEL, WAITING = "result", "error", "cancel", "waiting"
FAILED_SEQ, RETRY_SEQ, RETRY_INDEX = "failed_seq", "retry_seq", "retry_index"
QUEUE_TAG, DUE, DEADLINE, ALLOWED = "queue", "due", "deadline", "allowed"
FORKED_FROM, FORKS = "forked_from", "forks"

StateField = Literal[
    "status",
    "workflow",
    "holder",
    "lease",
    "epoch",
    "n",
    "created",
    "updated",
    "args",
    "parent",
    "result",
    "error",
    "cancel",
    "waiting",
    "failed_seq",
    "retry_seq",
    "retry_index",
    "queue",
    "due",
    "deadline",
    "allowed",
    "forked_from",
    "forks",
]
"""A field of a run's state hash."""

STATE_FIELDS: tuple[StateField, ...] = get_args(StateField)


def run_key(prefix: str, run_id: str, part: str) -> str:
    """The key of `part` (state, log, steps) of run `run_id`."""
    return f"{prefix}{{{run_id}}}:{part}"


def hook_key(prefix: str, token: str, part: str) -> str:
    """The key of `part` (box, meta, keys) of hook `token`."""
    return f"{prefix}{{hook:{token}}}:{part}"


def schedule_key(prefix: str, name: str, part: str = SCHEDULE) -> str:
    """The key of `part` (schedule) of schedule `name`."""
    return f"{prefix}{{s:{name}}}:{part}"


def queue_key(prefix: str, part: str, tag: str = DEFAULT_TAG) -> str:
    """The key of `part` (queue, timers, nudge, dead, ...) of queue partition `tag` (``q``: the default queue)."""
    return f"{prefix}{{{tag or DEFAULT_TAG}}}:{part}"


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    """A run's state hash, typed; a field the hash lacks has its default.

    `status` is ``""`` when there is no such run. Times are the server's
    milliseconds; `result`, `error` and `waiting` stay encoded.
    """

    status: RunStatus | Literal[""] = ""
    workflow: str = ""
    holder: str = ""
    lease: int = 0
    epoch: int = 0
    n: int = 0
    created: int = 0
    updated: int = 0
    args: str = ""
    parent: str = ""
    result: bytes | None = None
    error: bytes | None = None
    cancel: str | None = None
    waiting: bytes | None = None
    failed_seq: int | None = None
    retry_seq: int | None = None
    retry_index: int = 0
    queue: str = ""
    due: int | None = None
    deadline: int | None = None
    allowed: int | None = None
    forked_from: str = ""
    forks: str = ""

    @classmethod
    def from_hash(cls, raw: Mapping[Any, bytes | None]) -> RunState:
        """The state from a hash as Redis returns it (field -> bytes).

        Nothing in it can stop a reader: text that is not UTF-8 is replaced, a
        number that does not parse is 0 (None for the optional ones).
        """
        values: dict[str, object] = {}
        for key, value in raw.items():
            name = key.decode(errors="replace") if isinstance(key, bytes) else key
            if value is None or name not in _KINDS:
                continue
            kind = _KINDS[name]
            if kind is bytes:
                values[name] = bytes(value)
            elif kind is str:
                values[name] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            else:
                values[name] = _number(value, optional=kind is None)
        return cls(**values)  # type: ignore[arg-type]


def _number(value: bytes | str, *, optional: bool) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None if optional else 0


# How each field decodes: bytes (kept encoded), str, int (0 if not a number) or None (an int or None).
_KINDS: dict[str, type | None] = {
    "status": str,
    "workflow": str,
    "holder": str,
    "args": str,
    "parent": str,
    "cancel": str,
    "queue": str,
    "forked_from": str,
    "forks": str,
    "due": None,
    "deadline": None,
    "allowed": None,
    "lease": int,
    "epoch": int,
    "n": int,
    "created": int,
    "updated": int,
    "retry_index": int,
    "failed_seq": None,
    "retry_seq": None,
    "result": bytes,
    "error": bytes,
    "waiting": bytes,
}
