"""The log's codec (`_events`) and the user-value codec (`_values`): values, error data, events, hostile input."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.abc
import io
import pickle
import socket
import sys
import typing
import uuid
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from werkfluss import SerializationError
from werkfluss._events import (
    AnyEvent,
    ErrorInfo,
    Event,
    HookReceived,
    PatchMarked,
    RaceWon,
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunResumed,
    RunStarted,
    StepCompleted,
    StepFailed,
    TimerStarted,
    Waiting,
    decode_event,
    encode_event,
)
from werkfluss._values import decode_value, encode_call, encode_checked, encode_value

if TYPE_CHECKING:
    import importlib.machinery
    from collections.abc import Callable, Generator, Iterator, Sequence
    from types import ModuleType

OWNER = "shop.jobs:charge"


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Line:
    sku: str
    qty: int
    price: Decimal


@dataclasses.dataclass
class Order:
    id: uuid.UUID
    placed: datetime.datetime
    lines: list[Line]
    tags: set[str]
    size: tuple[int, int]
    blob: bytes
    note: str | None
    color: Color


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


@dataclasses.dataclass
class Box:
    payload: Any
    label: str = "box"


class Crate(msgspec.Struct):
    content: Any


def roundtrip(value: Any, type_: Any) -> Any:
    return decode_value(encode_value(value), type_, owner=OWNER, where="result")


# --- user values ---------------------------------------------------------------------------------------------------

EAST = datetime.timezone(datetime.timedelta(hours=2))
NEWFOUNDLAND = datetime.timezone(-datetime.timedelta(hours=3, minutes=30))


@pytest.mark.parametrize(
    ("value", "type_"),
    [
        (Point(1, -2), Point),
        (Line("apple", 3, Decimal("0.99")), Line),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID),
        (Color.BLUE, Color),
        (Level.HIGH, Level),
        ({"a": [(1, "x"), (2, "y")], "b": []}, dict[str, list[tuple[int, str]]]),
        ((1, "two", 3.0), tuple[int, str, float]),
        ({1, 2, 3}, set[int]),
        (frozenset({"a", "b"}), frozenset[str]),
        (b"\x00\xffraw", bytes),
        (None, None),
        (None, type(None)),
        (datetime.date(2024, 2, 29), datetime.date),
        (datetime.timedelta(days=1, seconds=5), datetime.timedelta),
        (datetime.datetime(2024, 1, 1, 12, 30), datetime.datetime),
        ([Point(0, 0), Point(1, 1)], list[Point]),
        ({"p": Point(3, 4)}, dict[str, Point]),
        (Box(Point(1, 2)), Box),
        (-(2**63), int),
        (2**64 - 1, int),
        ("ünïcödé ✓", str),
    ],
    ids=repr,
)
def test_values_round_trip_to_their_type(value: Any, type_: Any) -> None:
    back = roundtrip(value, type_)
    if type_ is Box:  # payload is Any: it comes back as builtins
        assert back == Box({"x": 1, "y": 2})
        return
    assert back == value
    assert type(back) is type(value)


def test_dataclass_with_everything_round_trips() -> None:
    order = Order(
        id=uuid.uuid4(),
        placed=datetime.datetime(2024, 5, 17, 9, 15, 0, 123456, tzinfo=EAST),
        lines=[Line("apple", 3, Decimal("0.99")), Line("pear", 1, Decimal("12.50"))],
        tags={"gift", "express"},
        size=(30, 40),
        blob=b"\x01\x02",
        note=None,
        color=Color.RED,
    )
    back = roundtrip(order, Order)
    assert back == order
    assert isinstance(back.lines[0], Line)
    assert isinstance(back.size, tuple)
    assert isinstance(back.tags, set)
    assert back.color is Color.RED
    assert str(back.lines[1].price) == "12.50"
    assert back.placed.utcoffset() == datetime.timedelta(hours=2)


@pytest.mark.parametrize("tz", [EAST, NEWFOUNDLAND, datetime.UTC], ids=str)
def test_aware_datetime_keeps_its_offset(tz: datetime.tzinfo) -> None:
    moment = datetime.datetime(2024, 3, 10, 23, 59, 58, 7, tzinfo=tz)
    back = roundtrip(moment, datetime.datetime)
    assert back == moment
    assert back.utcoffset() == moment.utcoffset()
    assert (back.hour, back.minute, back.microsecond) == (23, 59, 7)


@pytest.mark.parametrize("text", ["12.50", "0.000", "-1E+3", "123456789012345678901234567890.000000001"])
def test_decimal_keeps_its_exponent(text: str) -> None:
    back = roundtrip(Decimal(text), Decimal)
    assert isinstance(back, Decimal)
    assert str(back) == text
    assert back.as_tuple() == Decimal(text).as_tuple()


def test_bytearray_and_memoryview_are_stored_as_bytes() -> None:
    assert roundtrip(bytearray(b"ab"), bytes) == b"ab"
    assert roundtrip(memoryview(b"cd"), bytes) == b"cd"
    assert roundtrip([bytearray(b"x")], Any) == [b"x"]


def test_untyped_decoding_gives_builtins() -> None:
    back = roundtrip({"when": datetime.datetime(2024, 1, 1, tzinfo=EAST), "n": Decimal("1.10"), "s": {1}}, Any)
    assert back == {"when": "2024-01-01T00:00:00+02:00", "n": "1.10", "s": [1]}


def test_deterministic_encoding_sorts_dicts_and_sets() -> None:
    assert encode_value({"b": 1, "a": 2}, deterministic=True) == encode_value({"a": 2, "b": 1}, deterministic=True)
    assert encode_value({"z", "y", "x"}, deterministic=True) == encode_value(["x", "y", "z"])
    assert encode_value({"b": 1, "a": 2}) != encode_value({"a": 2, "b": 1})


def test_encode_call_is_args_then_kwargs() -> None:
    data = encode_call(OWNER, (1, "a"), {"k": Point(1, 2)})
    assert msgspec.msgpack.decode(data) == [[1, "a"], {"k": {"x": 1, "y": 2}}]


def test_encode_checked_returns_the_plain_encoding() -> None:
    assert encode_checked(Point(1, 2), owner=OWNER, where="result") == encode_value(Point(1, 2))


# --- unencodable values name owner and path ------------------------------------------------------------------------


def _generator() -> Generator[int, None, None]:
    yield 1


@pytest.fixture(params=["socket", "lambda", "file", "generator", "object"])
def unencodable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A value msgspec cannot encode; resources are closed after the test."""
    kind = request.param
    if kind == "socket":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            yield sock
    elif kind == "lambda":
        yield lambda: None
    elif kind == "file":
        with open(tmp_path / "f.txt", "w") as f:
            yield f
    elif kind == "generator":
        gen = _generator()
        yield gen
        gen.close()
    else:
        yield object()


def _raises(fn: Callable[[], object]) -> SerializationError:
    with pytest.raises(SerializationError) as info:
        fn()
    return info.value


def _check(err: SerializationError, where: str) -> None:
    message = str(err)
    assert err.step_id == OWNER
    assert err.where == where
    assert message.startswith(f"{OWNER}: {where} cannot be stored in the event log ("), message
    assert "Use builtins, dataclasses" in message


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda bad: ((1, bad), {}), "argument 1"),
        (lambda bad: ((bad,), {}), "argument 0"),
        (lambda bad: ((1,), {"conn": bad}), "argument 'conn'"),
        (lambda bad: (({"a": {"conn": bad}},), {}), "argument 0['a']['conn']"),
        (lambda bad: (({1: bad},), {}), "argument 0[1]"),
        (lambda bad: (([1, 2, bad],), {}), "argument 0[2]"),
        (lambda bad: (((0, bad),), {}), "argument 0[1]"),
        (lambda bad: ((Box(bad),), {}), "argument 0.payload"),
        (lambda bad: ((Crate(bad),), {}), "argument 0.content"),
        (lambda bad: ((), {"order": Box([Box("ok"), Box({"x": bad})])}), "argument 'order'.payload[1].payload['x']"),
        (lambda bad: ((), {"items": [Crate([bad])]}), "argument 'items'[0].content[0]"),
    ],
    ids=[
        "positional",
        "only-positional",
        "keyword",
        "nested-dict",
        "int-key",
        "list-index",
        "tuple-index",
        "dataclass-field",
        "struct-field",
        "deep-mix",
        "list-of-structs",
    ],
)
def test_encode_call_names_owner_and_path(
    unencodable: object, build: Callable[[object], tuple[tuple[Any, ...], dict[str, Any]]], where: str
) -> None:
    args, kwargs = build(unencodable)
    err = _raises(lambda: encode_call(OWNER, args, kwargs))
    _check(err, where)
    err = _raises(lambda: encode_call(OWNER, args, kwargs, deterministic=True))
    _check(err, where)


def test_encode_call_reason_names_the_type(unencodable: object) -> None:
    err = _raises(lambda: encode_call(OWNER, (unencodable,), {}))
    assert type(unencodable).__name__ in str(err)


def test_encode_checked_names_result_path(unencodable: object) -> None:
    err = _raises(lambda: encode_checked({"rows": [Box(unencodable)]}, owner=OWNER, where="result"))
    _check(err, "result['rows'][0].payload")


def test_unencodable_set_member_is_located_in_the_set(unencodable: object) -> None:
    err = _raises(lambda: encode_call(OWNER, ({unencodable},), {}))
    _check(err, "argument 0{…}")


def test_cyclic_list_is_reported_as_a_cycle() -> None:
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    err = _raises(lambda: encode_call(OWNER, (cyclic,), {}))
    _check(err, "argument 0[1]")
    assert "reference cycle" in str(err)


def test_cyclic_dict_and_dataclass_are_reported_as_cycles() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    _check(_raises(lambda: encode_call(OWNER, (), {"d": cyclic})), "argument 'd'['self']")
    box = Box(None)
    box.payload = [box]
    err = _raises(lambda: encode_checked(box, owner=OWNER, where="result"))
    _check(err, "result.payload[0]")
    assert "reference cycle" in str(err)


def test_integer_out_of_range_is_a_serialization_error() -> None:
    err = _raises(lambda: encode_call(OWNER, (1, 2**64), {}))
    assert err.step_id == OWNER
    assert err.where is not None and err.where.startswith("argument 1")
    assert "2**64" in str(err) or "int" in str(err)


def test_encode_value_raises_plain_errors() -> None:
    with pytest.raises(TypeError):
        encode_value(object())


# --- decoding stored values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "type_"),
    [
        (encode_value("abc"), int),
        (encode_value({"x": 1}), Point),
        (encode_value([1, 2]), Line),
        (encode_value("not-a-uuid"), uuid.UUID),
        (encode_value("green"), Color),
        (encode_value("yesterday"), datetime.datetime),
        (b"\x92\x01", list[int]),  # truncated
        (b"\xc1", Any),  # never-used msgpack byte
        (encode_value(1) + b"\x00", int),  # trailing data
    ],
    ids=["str-as-int", "missing-field", "array-as-dataclass", "bad-uuid", "bad-enum", "bad-datetime", "truncated",
         "reserved-byte", "trailing"],
)  # fmt: skip
def test_decode_value_of_incompatible_bytes_names_owner(data: bytes, type_: Any) -> None:
    with pytest.raises(SerializationError) as info:
        decode_value(data, type_, owner=OWNER, where="result of step #3")
    err = info.value
    assert err.step_id == OWNER
    assert err.where == "result of step #3"
    assert str(err).startswith(f"{OWNER}: the recorded result of step #3 does not decode as ")
    assert "annotated type change" in str(err)


@pytest.mark.parametrize(("data", "type_"), [(b"\xa1\x80", str), (b"\xa1\x80", Any), (b"\x91\xa1\x80", list[str])])
def test_decode_value_of_invalid_utf8_is_a_serialization_error(data: bytes, type_: Any) -> None:
    with pytest.raises(SerializationError, match=OWNER):
        decode_value(data, type_, owner=OWNER, where="result")


def test_decode_value_of_deep_nesting_is_a_serialization_error() -> None:
    deep = b"\x91" * 200_000 + b"\xc0"
    with pytest.raises(SerializationError, match=OWNER):
        decode_value(deep, Any, owner=OWNER, where="result")


# --- ErrorInfo -----------------------------------------------------------------------------------------------------


class PaymentDeclined(Exception):
    class Fraud(Exception):
        pass


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str is broken")


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_error_info_of_a_builtin_exception() -> None:
    info = ErrorInfo.from_exception(_raised(ValueError("bad amount")))
    assert info.type == "ValueError"
    assert info.message == "bad amount"
    assert info.traceback.startswith("Traceback (most recent call last):")
    assert "_raised" in info.traceback
    assert info.traceback.rstrip().endswith("ValueError: bad amount")


def test_error_info_of_an_unraised_exception_has_its_one_line() -> None:
    info = ErrorInfo.from_exception(KeyError("k"))
    assert (info.type, info.message) == ("KeyError", "'k'")
    assert "KeyError" in info.traceback


def test_error_info_type_is_qualified_by_module() -> None:
    assert ErrorInfo.from_exception(PaymentDeclined("no")).type == f"{__name__}.PaymentDeclined"
    assert ErrorInfo.from_exception(PaymentDeclined.Fraud()).type == f"{__name__}.PaymentDeclined.Fraud"
    assert ErrorInfo.from_exception(msgspec.DecodeError()).type == "msgspec.DecodeError"


def test_error_info_survives_a_broken_str() -> None:
    info = ErrorInfo.from_exception(_raised(BrokenStr()))
    assert info.type == f"{__name__}.BrokenStr"
    assert info.message == f"<{__name__}.BrokenStr whose str() failed>"
    assert "BrokenStr" in info.traceback


def test_error_info_keeps_the_cause_chain() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        info = ErrorInfo.from_exception(exc)
    assert "KeyError: 'inner'" in info.traceback
    assert "direct cause" in info.traceback


@pytest.mark.parametrize(
    ("exc", "type_"),
    [(ValueError("bad"), ValueError), (KeyError("k"), KeyError), (OSError("disk"), OSError),
     (TimeoutError("slow"), TimeoutError), (ZeroDivisionError("zero"), ZeroDivisionError)],
)  # fmt: skip
def test_rebuild_builtin_exceptions(exc: Exception, type_: type[Exception]) -> None:
    rebuilt = ErrorInfo(type=type_.__name__, message=str(exc)).rebuild()
    assert type(rebuilt) is type_
    assert rebuilt.args == (str(exc),)


def test_rebuild_after_a_round_trip_through_the_log() -> None:
    info = decode_event(encode_event(RunFailed(1.0, ErrorInfo.from_exception(ValueError("bad")))))
    assert isinstance(info, RunFailed)
    rebuilt = info.error.rebuild()
    assert isinstance(rebuilt, ValueError)
    assert str(rebuilt) == "bad"


class _ImportSpy(importlib.abc.MetaPathFinder):
    """Records every module an import statement looks for (and finds none of them)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        self.asked.append(fullname)
        return None


SENTINEL = "werkfluss_sentinel_mod"


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "subprocess.Popen",
        "posix.system",
        "eval",
        "exec",
        "__import__",
        "open",
        "compile",
        "getattr",
        "breakpoint",
        "type",
        "object",
        "PaymentDeclined",
        f"{__name__}.PaymentDeclined",
        SENTINEL,
        f"{SENTINEL}.Boom",
        f"builtins.{SENTINEL}",
        "builtins.ValueError",
        "KeyboardInterrupt",
        "SystemExit",
        "GeneratorExit",
        "BaseException",
        "BaseExceptionGroup",
        "UnicodeDecodeError",  # needs five arguments
        "",
        "__builtins__",
        "__loader__",
        "__spec__",
    ],
)
def test_rebuild_refuses_everything_but_builtin_exceptions(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / f"{SENTINEL}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass Boom(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spy = _ImportSpy()
    monkeypatch.setattr(sys, "meta_path", [spy, *sys.meta_path])
    assert SENTINEL not in sys.modules
    loaded = set(sys.modules)

    assert ErrorInfo(type=name, message="rm -rf /").rebuild() is None

    assert SENTINEL not in sys.modules
    assert set(sys.modules) == loaded
    assert spy.asked == []
    assert not marker.exists()


def test_the_sentinel_module_would_be_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: the sentinel is real, so its absence from sys.modules means something."""
    marker = tmp_path / "imported"
    (tmp_path / f"{SENTINEL}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, SENTINEL, raising=False)
    __import__(SENTINEL)
    assert marker.exists()
    del sys.modules[SENTINEL]


# --- events --------------------------------------------------------------------------------------------------------

ERROR = ErrorInfo(type="ValueError", message="bad", traceback="Traceback ...\nValueError: bad\n")
ALL_EVENTS: list[AnyEvent] = [
    RunStarted(1.5, "shop.jobs:fulfil", msgspec.Raw(encode_call("x", (1, "a"), {"k": [1, 2]}))),
    RunResumed(2.0, "abc123def456/4242/0123456789ab"),
    StepCompleted(3.0, 1, "shop.jobs:charge", 2, 2.5, msgspec.Raw(encode_value([[], {}])), msgspec.Raw(b"\xc0")),
    StepFailed(4.0, 2, "shop.jobs:ship", 1, 3.5, ERROR, False, 9.25),
    StepFailed(4.0, 2, "shop.jobs:ship", 3, 3.5, ERROR, True),
    RunCompleted(5.0, msgspec.Raw(encode_value({"ok": True}))),
    RunFailed(6.0, ERROR, 2),
    RunFailed(6.0, ERROR),
    RunBlocked(7.0, ErrorInfo(type="werkfluss.NonDeterminismError", message="step #1 ...")),
    RunPaused(8.0, [Waiting("hook", token="approve:7"), Waiting("timer", due=9.5), Waiting("child", run="r/3")]),
    TimerStarted(8.5, 3, 86408.5),
    HookReceived(9.0, 4, "approve:7", 1, "1700000000000-0", msgspec.Raw(encode_value({"ok": True}))),
    RaceWon(9.5, 5, 1),
    PatchMarked(9.75, "charge-v2", 6),
    RunCancelled(10.0, "customer asked"),
]


def test_the_event_list_covers_every_event_type() -> None:
    assert {type(e) for e in ALL_EVENTS} == set(typing.get_args(AnyEvent))
    assert all(issubclass(t, Event) for t in typing.get_args(AnyEvent))


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: AnyEvent) -> None:
    data = encode_event(event)
    back = decode_event(data)
    assert type(back) is type(event)
    assert back == event
    assert encode_event(back) == data


def test_events_are_compact_tagged_arrays() -> None:
    raw = msgspec.msgpack.decode(encode_event(RunResumed(2.0, "h")))
    assert raw == ["run-resumed", 2.0, "h"]
    tags = [msgspec.msgpack.decode(encode_event(e))[0] for e in ALL_EVENTS]
    assert set(tags) == {
        "run-started", "run-resumed", "step-completed", "step-failed", "run-completed", "run-failed", "run-blocked",
        "run-paused", "timer-started", "hook-received", "race-won", "run-cancelled",
        "patch-marked",
    }  # fmt: skip


def test_raw_values_inside_events_decode_as_values() -> None:
    event = decode_event(encode_event(ALL_EVENTS[0]))
    assert isinstance(event, RunStarted)
    assert decode_value(event.args, Any, owner="x", where="arguments") == [[1, "a"], {"k": [1, 2]}]


def test_entries_written_before_a_field_was_appended_still_decode() -> None:
    old_failed = msgspec.msgpack.encode(["step-failed", 1.0, 1, "s", 1, 0.5, ["ValueError", "m"], True])
    event = decode_event(old_failed)
    assert isinstance(event, StepFailed)
    assert event.retry_at is None
    assert event.error == ErrorInfo("ValueError", "m", "")
    old_run_failed = decode_event(msgspec.msgpack.encode(["run-failed", 1.0, ["KeyError", "k", "tb"]]))
    assert isinstance(old_run_failed, RunFailed)
    assert old_run_failed.seq is None


def test_entries_from_a_newer_writer_with_extra_fields_still_decode() -> None:
    newer = msgspec.msgpack.encode(["run-resumed", 1.0, "holder", "a field added later", {"x": 1}])
    assert decode_event(newer) == RunResumed(1.0, "holder")


# --- hostile input -------------------------------------------------------------------------------------------------


class _Touch:
    """Unpickling this creates `path`: a stand-in for any code a pickle could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_a_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Touch(marker))
    pickle.loads(payload)  # the payload is armed ...
    assert marker.exists()
    marker.unlink()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # ... but werkfluss never fires it
        data = pickle.dumps(_Touch(marker), protocol=protocol)
        with pytest.raises(msgspec.DecodeError):
            decode_event(data)
        with pytest.raises(SerializationError):
            decode_value(data, Any, owner=OWNER, where="result")
        with pytest.raises(msgspec.DecodeError):
            decode_event(msgspec.msgpack.encode(["run-started", 1.0, "wf", data]) + data)
        event = decode_event(msgspec.msgpack.encode(["run-completed", 1.0, data]))  # bytes inside Raw stay data
        assert isinstance(event, RunCompleted)
        assert decode_value(event.result, bytes, owner=OWNER, where="result") == data
    assert not marker.exists()


def test_deeply_nested_arrays_are_rejected() -> None:
    deep = b"\x91" * 200_000 + b"\xc0"
    with pytest.raises(msgspec.DecodeError):
        decode_event(deep)
    with pytest.raises(msgspec.DecodeError):
        decode_event(b"\x93\xabrun-resumed\xcb?\xf0\x00\x00\x00\x00\x00\x00" + deep)


def _deep_inside_raw() -> bytes:
    """A run-completed event whose Raw `result` is 200k nested one-element arrays."""
    head = msgspec.msgpack.encode(["run-completed", 1.0])
    return b"\x93" + head[1:] + b"\x91" * 200_000 + b"\xc0"


def test_deep_nesting_inside_a_raw_field_fails_with_an_error_the_log_reader_catches() -> None:
    with pytest.raises((msgspec.DecodeError, ValueError, RecursionError)):
        decode_event(_deep_inside_raw())


def test_invalid_utf8_fails_with_an_error_the_log_reader_catches() -> None:
    data = encode_event(RunResumed(1.0, "holder")).replace(b"holder", b"\x80older")
    with pytest.raises((msgspec.DecodeError, ValueError, RecursionError)):
        decode_event(data)


def test_deep_nesting_inside_a_raw_field_raises_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_event(_deep_inside_raw())


@pytest.mark.parametrize("where", [b"run-resumed", b"holder"])
def test_invalid_utf8_raises_decode_error(where: bytes) -> None:
    data = encode_event(RunResumed(1.0, "holder")).replace(where, b"\x80" + where[1:])
    with pytest.raises(msgspec.DecodeError):
        decode_event(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc0",
        b"\xc1",
        b"\x90",
        msgspec.msgpack.encode(["no-such-event", 1.0]),
        msgspec.msgpack.encode([None, 1.0]),
        msgspec.msgpack.encode([7, 1.0]),
        msgspec.msgpack.encode({"k": "run-resumed", "time": 1.0, "holder": "h"}),
        msgspec.msgpack.encode(["run-resumed", "not a time", "h"]),
        msgspec.msgpack.encode(["run-resumed", 1.0, 42]),
        msgspec.msgpack.encode(["run-resumed", 1.0]),
        msgspec.msgpack.encode(["step-failed", 1.0, "one", "s", 1, 0.5, ["E", "m"], True]),
        msgspec.msgpack.encode(["step-failed", 1.0, 1, "s", 1, 0.5, "not an error", True]),
        msgspec.msgpack.encode(["step-failed", 1.0, 1, "s", 1, 0.5, ["E", "m"], "yes"]),
        msgspec.msgpack.encode(["run-failed", 1.0, [1, 2, 3]]),
        msgspec.msgpack.encode(["run-failed", 1.0, ["E", "m"], "seq"]),
        msgspec.msgpack.encode(["run-started", 1.0, "wf"]),
        encode_event(RunResumed(1.0, "h"))[:-1],
        encode_event(RunResumed(1.0, "h")) + b"\xc0",
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion elements
        b"\xdb\xff\xff\xff\xff",  # string claiming 4 GiB
        b"\xc7\x08\xff" + b"\x00" * 8,  # timestamp extension where an event belongs
    ],
)
def test_garbage_raises_only_decode_errors(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_event(data)


# --- properties ----------------------------------------------------------------------------------------------------

builtin_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@hsettings(max_examples=300, deadline=None, database=None)
@given(builtin_values)
def test_builtin_values_round_trip(value: Any) -> None:
    assert decode_value(encode_value(value), Any, owner=OWNER, where="result") == value
    assert decode_value(encode_value(value, deterministic=True), Any, owner=OWNER, where="result") == value


def _decode_or_decode_error(data: bytes) -> None:
    """decode_event returns an event or raises what _attach.read_replay turns into a StorageError.

    Strictly the docstring promises msgspec.DecodeError only; the UnicodeDecodeError (a ValueError) and
    RecursionError cases are pinned by the xfail tests above.
    """
    try:
        event = decode_event(data)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return
    assert isinstance(event, typing.get_args(AnyEvent))


@hsettings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_decode_errors(data: bytes) -> None:
    _decode_or_decode_error(data)


TAGS = ["run-started", "run-resumed", "step-completed", "step-failed", "run-completed", "run-failed", "run-blocked"]


@hsettings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(TAGS), st.lists(builtin_values, max_size=10))
def test_well_formed_msgpack_with_wrong_shapes_raises_only_decode_errors(tag: str, fields: list[Any]) -> None:
    _decode_or_decode_error(msgspec.msgpack.encode([tag, *fields]))


@hsettings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(ALL_EVENTS), st.data())
def test_corrupted_events_raise_only_decode_errors(event: AnyEvent, data: st.DataObject) -> None:
    raw = bytearray(encode_event(event))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _decode_or_decode_error(bytes(raw[:cut]))
    _decode_or_decode_error(bytes(raw))


def test_io_objects_are_not_values() -> None:
    with pytest.raises(SerializationError, match="argument 0"):
        encode_call(OWNER, (io.BytesIO(b"x"),), {})
