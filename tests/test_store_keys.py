"""The key layout in `werkfluss._store._keys`: its docstring lists every key and state field the store uses,
and `RunState` reads every field the scripts write."""

from __future__ import annotations

import re

from werkfluss._store import (
    SCRIPTS,
    RunState,
    _flow,
    _fork,
    _hooks,
    _keys,
    _queue,
    _run_log,
    _runs,
    _schedules,
    _timers,
)

DOC = _keys.__doc__ or ""


def _documented_keys() -> set[str]:
    """The keys of the layout list, as ``(tag or "")`` + ``:part`` or the bare name: ``{R}:state``, ``runs``."""
    return set(re.findall(r"^    P(\{[^}]+\}:\w+|\w+)\s", DOC, flags=re.MULTILINE))


def _documented_fields() -> list[str]:
    section = DOC.split("State fields", 1)[1]
    return re.findall(r"^    (\w+)\s{2,}", section, flags=re.MULTILINE)


def test_the_layout_lists_every_key_and_no_other() -> None:
    expected = (
        {f"{{R}}:{part}" for part in _keys.RUN_PARTS}
        | {f"{{hook:T}}:{part}" for part in _keys.HOOK_PARTS}
        | {f"{{q}}:{part}" for part in _keys.QUEUE_PARTS}
        | {f"{{s:N}}:{part}" for part in _keys.SCHEDULE_PARTS}
        | set(_keys.UNTAGGED)
    )
    assert _documented_keys() == expected


def test_the_layout_lists_every_state_field_in_order() -> None:
    assert _documented_fields() == list(_keys.STATE_FIELDS)
    assert RunState.__struct_fields__ == _keys.STATE_FIELDS
    assert set(_keys._KINDS) == set(_keys.STATE_FIELDS)  # each decodes as its kind


def _calls(source: str) -> list[tuple[str, str, list[str]]]:
    """``(command, first key, the other arguments)`` of each ``redis.call`` in a script."""
    found = []
    for match in re.finditer(r"redis\.call\('(\w+)',\s*(KEYS\[\d\])", source):
        args, depth, current, i = [], 0, "", match.end()
        while depth >= 0:
            char = source[i]
            if char in "({":
                depth += 1
            elif char in ")}":
                depth -= 1
            if depth < 0 or (char == "," and depth == 0):
                if current.strip():
                    args.append(current.strip())
                current = ""
            else:
                current += char
            i += 1
        found.append((match[1], match[2], args))
    return found


def test_every_state_field_a_run_script_touches_is_a_known_field() -> None:
    touched = set()
    for script in (*_runs.SCRIPTS, *_run_log.SCRIPTS, *_fork.SCRIPTS):
        for command, key, args in _calls(script.source):
            if key != "KEYS[1]" or not command.startswith("H"):  # KEYS[1] is the state hash in every run script
                continue
            names = args[0::2] if command in ("HSET", "HSETNX") else args[:1] if command == "HINCRBY" else args
            touched |= {name.strip("'") for name in names if name.startswith("'")}
    # Every field is named in some script; result and error only through FINISH's field argument.
    assert touched | {_keys.RESULT, _keys.ERROR} == set(_keys.STATE_FIELDS)


def test_scripts_are_listed_once_by_family() -> None:
    families = (
        *(_runs.SCRIPTS, _run_log.SCRIPTS, _hooks.SCRIPTS, _timers.SCRIPTS, _queue.SCRIPTS, _flow.SCRIPTS),
        _schedules.SCRIPTS,
        _fork.SCRIPTS,
    )
    assert SCRIPTS == tuple(script for family in families for script in family)
    assert len({script.sha for script in SCRIPTS}) == len({script.name for script in SCRIPTS}) == len(SCRIPTS)


def test_a_state_hash_reads_into_a_run_state_whatever_it_holds() -> None:
    state = RunState.from_hash(
        {
            b"status": b"paused",
            b"n": b"7",
            b"lease": b"junk",
            b"failed_seq": b"",
            b"retry_seq": b"3",
            b"holder": b"h\xff",
            b"waiting": b"\x90",
            b"other": b"kept out",
        }
    )
    assert state == RunState(
        status="paused", n=7, lease=0, failed_seq=None, retry_seq=3, holder="h\ufffd", waiting=b"\x90"
    )
    assert RunState.from_hash({}).status == ""
    assert RunState.from_hash({"status": b"failed", "error": None}).error is None  # HMGET's absent field
