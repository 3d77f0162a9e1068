"""Options, frozen: step options, retry policies and connection settings.

Each default is documented once, here.
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec

from ._errors import ConfigurationError

__all__ = ["RetryPolicy", "Settings", "StepOptions", "check_limit", "parse_duration", "redact"]

Backoff = Literal["exponential", "linear", "constant"]


def _env_variable(field: str) -> str:
    """The environment variable of a `Settings` field: ``WERKFLUSS_<FIELD>`` (``WERKFLUSS_DIR`` for `directory`)."""
    return "WERKFLUSS_DIR" if field == "directory" else f"WERKFLUSS_{field.upper()}"


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How often and how patiently a step is retried.

    Attributes:
        retries: Retries after the first attempt: ``retries=3`` allows 4 attempts.
        backoff: ``"exponential"`` (base, 2·base, 4·base, …), ``"linear"``
            (base, 2·base, 3·base, …) or ``"constant"`` (base every time).
        base: The first delay in seconds (default 1.0).
        max_delay: No delay is longer than this many seconds (default 60).
        retry_on: Exception types that are retried; any other fails the step
            at once. Default: every `Exception`.
    """

    retries: int = 0
    backoff: Backoff = "exponential"
    base: float = 1.0
    max_delay: float = 60.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigurationError(f"retries must be >= 0, got {self.retries}")
        if not (_finite(self.base) and self.base >= 0 and _finite(self.max_delay) and self.max_delay >= 0):
            raise ConfigurationError(
                f"retry delays must be >= 0 and finite, got base={self.base}, max_delay={self.max_delay}"
            )
        if self.backoff not in ("exponential", "linear", "constant"):
            raise ConfigurationError(f"unknown backoff {self.backoff!r}: use exponential, linear or constant")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1-based)."""
        if self.backoff == "exponential":
            # Capping the exponent keeps 2**n finite for retry-for-days policies.
            raw = self.base * 2.0 ** min(failures - 1, 1000)
        elif self.backoff == "linear":
            raw = self.base * failures
        else:
            raw = self.base
        return min(raw, self.max_delay)

    def retries_on(self, exc: BaseException) -> bool:
        """Whether `exc` is one this policy retries."""
        return isinstance(exc, self.retry_on)


class StepOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Options of one step: its retry policy, per-attempt timeout in seconds, and
    whether a replay compares the call's arguments with the recorded ones."""

    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None
    check_args: bool = True


def step_options(retries: int | RetryPolicy, timeout: float | None, check_args: bool = True) -> StepOptions:
    """Build `StepOptions` from the keyword arguments of `step()`."""
    policy = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries)
    if timeout is not None and not (_finite(timeout) and timeout > 0):
        raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout}")
    if not isinstance(check_args, bool):
        raise ConfigurationError(f"check_args must be True or False, got {check_args!r}")
    return StepOptions(retry=policy, timeout=timeout, check_args=check_args)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)\s*")


def check_limit(limit: int) -> int:
    """`limit` as a count of things to list: an int of at least 1.

    Raises:
        ConfigurationError: It is not.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ConfigurationError(f"limit must be at least 1 and a whole number, got {limit!r}")
    if limit < 1:
        raise ConfigurationError(f"limit must be at least 1, got {limit}")
    return limit


def parse_duration(duration: float | timedelta | str, *, what: str = "duration") -> float:
    """Seconds in `duration`: a number of seconds, a `timedelta`, or text.

    Text is one or more ``<number><unit>`` parts, units ``ms s m h d w``:
    ``"400ms"``, ``"2h"``, ``"7d"``, ``"1h30m"``.

    Raises:
        ConfigurationError: naming `what` and the value, for anything else
            (negative, not finite, unknown unit).
    """
    if isinstance(duration, timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, str):
        pos, seconds = 0, 0.0
        text = duration.strip()
        while pos < len(text):
            match = _DURATION.match(text, pos)
            if match is None or match.end() == pos:
                raise ConfigurationError(
                    f"invalid {what} {duration!r}: use seconds, a timedelta, or text like '400ms', '2h', '7d', '1h30m'"
                )
            seconds += float(match[1]) * _UNITS[match[2]]
            pos = match.end()
        if not text:
            raise ConfigurationError(f"invalid {what} {duration!r}: it is empty")
    elif isinstance(duration, (int, float)) and not isinstance(duration, bool):
        seconds = float(duration)
    else:
        raise ConfigurationError(f"invalid {what} {duration!r}: use seconds, a timedelta or text like '2h'")
    if not (_finite(seconds) and seconds >= 0):
        raise ConfigurationError(f"invalid {what} {duration!r}: it must be finite and not negative")
    return seconds


def redact(url: str) -> str:
    """`url` with any password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


Fsync = Literal["everysec", "always"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the event log lives and how werkfluss talks to it.

    Attributes:
        redis_url: A Redis ≥ 6.2 or Valkey URL (``redis://``, ``rediss://``,
            ``unix://``, with auth). ``None`` (the default) starts an embedded
            Valkey server with its data in `directory`.
        directory: Data directory of the embedded server (default ``./.werkfluss``).
        prefix: Prefix of every key werkfluss writes (default ``werkfluss:``).
        fsync: Embedded server's ``appendfsync``: ``"everysec"`` (default; a
            power loss can lose the last second) or ``"always"``.
        lease: Seconds a run stays claimed by a process that stopped
            renewing it (default 10); renewed every third of that.
        max_payload: Bytes one encoded value may take in the log: a step's
            or workflow's arguments, a result, a hook payload (default 1 MiB).
            Larger ones raise `PayloadTooLargeError` before anything is written.
        history_warning: Events in one run's log past which a warning is
            logged, once per process that runs it (default 10,240).
        max_history: Events one run's log may hold; a run that needs more
            fails with `HistoryTooLargeError` (default 51,200). Raise it and
            resume the run to go on.
        hold: Seconds: a durable sleep due within this long is waited for
            in memory; a longer one (with nothing else to do) pauses the run,
            which a timer resumes (default 2).
        settle: Seconds everything in a run must go on waiting (for hooks,
            timers, paused child runs) before the run pauses (default 0.01).
    """

    redis_url: str | None = None
    directory: str = ".werkfluss"
    prefix: str = "werkfluss:"
    fsync: Fsync = "everysec"
    lease: float = 10.0
    max_payload: int = 1 << 20
    history_warning: int = 10_240
    max_history: int = 51_200
    hold: float = 2.0
    settle: float = 0.01

    def __post_init__(self) -> None:
        if self.fsync not in ("everysec", "always"):
            raise ConfigurationError(f"fsync must be 'everysec' or 'always', got {self.fsync!r}")
        if not (_finite(self.lease) and self.lease >= 0.5):
            raise ConfigurationError(f"lease must be >= 0.5 seconds, got {self.lease}")
        if not self.prefix or any(c in self.prefix for c in "{}"):
            raise ConfigurationError(f"invalid key prefix {self.prefix!r}: non-empty, without braces")
        for name in ("max_payload", "history_warning", "max_history"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("hold", "settle"):
            if not (_finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigurationError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from the environment, one variable per field:
        ``WERKFLUSS_REDIS_URL``, ``WERKFLUSS_DIR``, ``WERKFLUSS_PREFIX``,
        ``WERKFLUSS_FSYNC``, ``WERKFLUSS_LEASE``, ``WERKFLUSS_MAX_PAYLOAD``,
        ``WERKFLUSS_HISTORY_WARNING``, ``WERKFLUSS_MAX_HISTORY``,
        ``WERKFLUSS_HOLD`` and ``WERKFLUSS_SETTLE``;
        keyword arguments that are not ``None`` win."""
        values: dict[str, object] = {}
        for name, field_type in (
            ("lease", float),
            ("max_payload", int),
            ("history_warning", int),
            ("max_history", int),
            ("redis_url", str),
            ("directory", str),
            ("prefix", str),
            ("fsync", str),
            ("hold", float),
            ("settle", float),
        ):
            variable = _env_variable(name)
            raw = os.environ.get(variable)
            if not raw:
                continue
            try:
                values[name] = field_type(raw)
            except ValueError:
                kind = "a number" if field_type is float else "a whole number"
                raise ConfigurationError(f"{variable} must be {kind}, got {raw!r}") from None
        unknown = sorted(set(overrides) - set(cls.__struct_fields__))
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(cls.__struct_fields__)}"
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"invalid werkfluss settings: {exc}") from None
