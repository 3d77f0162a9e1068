"""The one codec for user values: arguments, results and hook payloads.

They are stored as raw msgpack inside the log's events. They pass through
`msgspec.to_builtins` first, which keeps what msgpack's timestamp extension
would lose: an aware datetime's UTC offset, a Decimal's exponent. They
decode to the annotated type (`msgspec.convert` semantics), so a step
returning a dataclass returns an equal dataclass on replay. A value that
cannot be stored raises `SerializationError` naming the part at fault; one
over the size limit, `PayloadTooLargeError` naming the largest argument.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgspec

from ._errors import PayloadTooLargeError, SerializationError

__all__ = [
    "call_digest",
    "convert_value",
    "decode_value",
    "encode_call",
    "encode_checked",
    "encode_run_call",
    "encode_value",
    "first_difference",
]

_value_encoder = msgspec.msgpack.Encoder()
_deterministic_encoder = msgspec.msgpack.Encoder(order="deterministic")
_KEEP = (bytes, bytearray, memoryview)


def encode_value(value: Any, *, deterministic: bool = False) -> bytes:
    """Encode a user value; raises `TypeError`/`ValueError`/`RecursionError` if it cannot."""
    builtin = msgspec.to_builtins(value, builtin_types=_KEEP, order="deterministic" if deterministic else None)
    return (_deterministic_encoder if deterministic else _value_encoder).encode(builtin)


def encode_checked(
    value: Any, *, owner: str, where: str, deterministic: bool = False, limit: int | None = None
) -> bytes:
    """`encode_value`, turning failure into a `SerializationError` naming `owner` and `where`,
    and a value over `limit` bytes into a `PayloadTooLargeError`."""
    try:
        raw = encode_value(value, deterministic=deterministic)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        path, reason = _find_unencodable(value, where, set())
        raise SerializationError(
            f"{owner}: {path} cannot be stored in the event log ({reason or exc}). Use builtins, "
            f"dataclasses, msgspec Structs, datetime, UUID, Decimal or enums.",
            step_id=owner,
            where=path,
        ) from None
    if limit is not None and len(raw) > limit:
        raise _too_large(owner, where, len(raw), limit)
    return raw


def encode_call(
    owner: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, deterministic: bool = False, limit: int | None = None
) -> bytes:
    """Encode a call's arguments as ``[args, kwargs]``, naming the argument at fault
    (one that does not encode, or the largest when together they exceed `limit` bytes)."""
    try:
        raw = encode_value([args, kwargs], deterministic=deterministic)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
        for i, arg in enumerate(args):
            encode_checked(arg, owner=owner, where=f"argument {i}", deterministic=deterministic)
        for key, arg in kwargs.items():
            encode_checked(arg, owner=owner, where=f"argument {key!r}", deterministic=deterministic)
        raise  # pragma: no cover - one of the loops above raises
    if limit is not None and len(raw) > limit:
        sizes = [(len(encode_value(a)), f"argument {i}") for i, a in enumerate(args)]
        sizes += [(len(encode_value(a)), f"argument {k!r}") for k, a in kwargs.items()]
        largest = max(sizes)[1] if sizes else "arguments"
        raise _too_large(owner, f"the arguments (largest: {largest})", len(raw), limit)
    return raw


def encode_run_call(
    owner: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, limit: int | None = None
) -> tuple[bytes, bytes]:
    """A workflow call's arguments twice: as given, and canonical.

    The first is what is stored and decoded, so the body sees a dict's keys
    in the caller's order in every process. The second sorts dict keys and
    sets: run IDs and argument digests derive from it, so equal arguments
    reach the same run however they were built.
    """
    given = encode_call(owner, args, kwargs, limit=limit)
    return given, encode_value([args, kwargs], deterministic=True)


def call_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """A few bytes that change when a call's arguments change (dict and set order aside).

    The canonical msgpack of the call itself when it is short (most calls: an ID,
    a number), else 8 bytes of its BLAKE2b: a replay computes one per recorded
    step, and hashing would cost 4x the encoding. Straight to msgpack, skipping
    `to_builtins`: a digest needs stability, not a readable form. Raises what the
    encoder raises; callers have encoded the arguments once before.
    """
    canonical = _deterministic_encoder.encode([args, kwargs])
    return canonical if len(canonical) <= _SHORT_CALL else hashlib.blake2b(canonical, digest_size=8).digest()


_SHORT_CALL = 24  # bytes of canonical msgpack kept as their own digest


def first_difference(recorded: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Where the call `(args, kwargs)` differs from the recorded ``[args, kwargs]``:
    ``argument 0['fruit']: recorded 'pear', now 'apple'``."""
    try:
        before = msgspec.msgpack.decode(recorded)
        now = msgspec.msgpack.decode(encode_value([args, kwargs], deterministic=True))
        before_args, before_kwargs = before
        now_args, now_kwargs = now
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return "the recorded arguments do not decode"
    if len(before_args) != len(now_args):
        return f"recorded {len(before_args)} positional arguments, now {len(now_args)}"
    pairs = [(f"argument {i}", a, b) for i, (a, b) in enumerate(zip(before_args, now_args, strict=True))]
    pairs += [
        (f"argument {k!r}", before_kwargs.get(k, _MISSING), now_kwargs.get(k, _MISSING))
        for k in sorted(set(before_kwargs) | set(now_kwargs))
    ]
    for path, a, b in pairs:
        found = _differs(path, a, b)
        if found:
            return found
    return "the arguments differ only in a dict's or a set's order"


_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "nothing"})()


def _differs(path: str, before: Any, now: Any) -> str:
    if isinstance(before, dict) and isinstance(now, dict):
        for key in sorted(set(before) | set(now), key=repr):
            found = _differs(f"{path}[{key!r}]", before.get(key, _MISSING), now.get(key, _MISSING))
            if found:
                return found
        return ""
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        for i, (a, b) in enumerate(zip(before, now, strict=True)):
            found = _differs(f"{path}[{i}]", a, b)
            if found:
                return found
        return ""
    if type(before) is type(now) and before == now:
        return ""
    return f"{path}: recorded {_short(before)}, now {_short(now)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _too_large(owner: str, where: str, size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{owner}: {where}: {size:,} bytes encoded, over the limit of {limit:,} (Settings.max_payload). "
        f"Keep large data elsewhere (a file, object storage) and pass a reference.",
        step_id=owner,
        where=where,
        size=size,
        limit=limit,
    )


def decode_value(data: bytes, type_: Any, *, owner: str, where: str) -> Any:
    """Decode a stored value to `type_` (``Any`` keeps the plain msgpack value)."""
    try:
        return msgspec.msgpack.decode(data, type=type_)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise SerializationError(
            f"{owner}: the recorded {where} does not decode as {getattr(type_, '__name__', type_)}: {exc}. "
            f"Did the annotated type change incompatibly since it was recorded?",
            step_id=owner,
            where=where,
        ) from None


def convert_value(data: bytes, type_: Any, value: Any, *, owner: str, where: str) -> Any:
    """The value a replay will return for `value`, just encoded as `data`: decoded to
    its annotation `type_`, exactly as a replay decodes it.

    Raises:
        SerializationError: `value` does not match `type_` (``None`` for ``-> str``, say).
    """
    try:
        return msgspec.msgpack.decode(data, type=type_)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise SerializationError(
            f"{owner}: the {where} {_short(value)} does not match its annotation "
            f"{getattr(type_, '__name__', type_)} ({exc}). A replay returns the recorded {where} "
            f"decoded to the annotation, so it must match: return that type, or change the annotation.",
            step_id=owner,
            where=where,
        ) from None


def _find_unencodable(value: Any, path: str, seen: set[int]) -> tuple[str, str]:
    """Walk `value` for the first part that does not encode; returns (path, reason)."""
    if id(value) in seen:
        return path, "it contains a reference cycle"
    try:
        msgspec.to_builtins(value, builtin_types=_KEEP)
        return path, ""
    except RecursionError:
        pass
    except (TypeError, ValueError, OverflowError) as exc:
        reason = str(exc)
        if not isinstance(value, (dict, list, tuple, set, frozenset)) and not _has_fields(value):
            return path, reason
    seen.add(id(value))
    children: list[tuple[str, Any]]
    if isinstance(value, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, (set, frozenset)):
        children = [(f"{path}{{…}}", v) for v in value]
    else:
        children = [(f"{path}.{name}", getattr(value, name, None)) for name in _field_names(value)]
    for child_path, child in children:
        found, reason = _find_unencodable(child, child_path, seen)
        if reason:
            return found, reason
    return path, f"{type(value).__name__} is not supported"


def _has_fields(value: Any) -> bool:
    return dataclasses.is_dataclass(value) or isinstance(value, msgspec.Struct)


def _field_names(value: Any) -> list[str]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value)]
    if isinstance(value, msgspec.Struct):
        return list(value.__struct_fields__)
    return []
