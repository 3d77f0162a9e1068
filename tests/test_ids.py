"""Stable identities (`werkfluss._ids`): step/workflow IDs, the registry, run IDs."""

from __future__ import annotations

import functools
import importlib.machinery
import os
import subprocess
import sys
import types
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from werkfluss import ConfigurationError, step, workflow
from werkfluss._ids import callable_id, check_run_id, derive_run_id, module_name, register
from werkfluss._values import encode_call

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


async def top_level() -> int:
    return 1


class Holder:
    async def method(self) -> int:
        return 2


def unique(label: str) -> str:
    """An ID no other test (or earlier run of this test) has registered."""
    return f"test-ids-{label}-{uuid.uuid4().hex[:8]}"


def run_python(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``python <args>`` in a fresh process; return its stdout, failing on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


SCRIPT = """
from werkfluss import step, workflow

@step
async def fetch(x: int) -> int:
    return x

@workflow
async def flow() -> None:
    pass

if __name__ == "__main__":
    print(fetch.id)
    print(flow.id)
    print(step(fetch.fn).id)
"""


# --- callable_id ---------------------------------------------------------------------------------------------------


def test_callable_id_is_module_colon_qualname() -> None:
    assert callable_id(top_level) == f"{__name__}:top_level"


def test_method_id_uses_the_qualified_name_without_a_line() -> None:
    assert callable_id(Holder.method) == f"{__name__}:Holder.method"
    assert callable_id(Holder().method) == f"{__name__}:Holder.method"


def test_lambda_id_gets_its_first_line() -> None:
    fn = lambda: None  # noqa: E731
    line = fn.__code__.co_firstlineno
    assert callable_id(fn) == f"{__name__}:test_lambda_id_gets_its_first_line.<locals>.<lambda>@{line}"


def test_local_function_id_gets_its_first_line() -> None:
    async def inner() -> None:
        pass

    line = inner.__code__.co_firstlineno
    assert callable_id(inner) == f"{__name__}:test_local_function_id_gets_its_first_line.<locals>.inner@{line}"


def test_two_local_functions_with_one_qualname_get_distinct_ids() -> None:
    def make() -> list[Callable[..., Any]]:
        fns: list[Callable[..., Any]] = []

        async def inner() -> None:
            pass

        fns.append(inner)

        async def inner() -> None:  # type: ignore[no-redef]
            pass

        fns.append(inner)
        return fns

    first, second = make()
    assert first.__qualname__ == second.__qualname__
    assert callable_id(first) != callable_id(second)


def test_name_overrides_the_derived_id() -> None:
    assert callable_id(top_level, "billing.charge") == "billing.charge"
    assert callable_id(lambda: None, "custom") == "custom"


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "line\nbreak", "carriage\rreturn", "tab\there"])
def test_invalid_names_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid name") as info:
        callable_id(top_level, bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["my flow", "a\x0bb", "a\x0cb", "a\x00b", "a\u3000b"])
def test_names_with_other_whitespace_or_control_characters_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid name"):
        callable_id(top_level, bad)


def test_accepted_names_can_always_derive_a_run_id() -> None:
    """Any name callable_id accepts must give a valid derived run ID (start() derives one)."""
    for name in ["plain", "with:colon", "dots.and-dashes", "ünïcödé", "x" * 300]:
        ident = callable_id(top_level, name)
        assert check_run_id(derive_run_id(ident, b"\x90"))


def test_object_without_a_name_needs_name() -> None:
    partial = functools.partial(top_level)
    with pytest.raises(ConfigurationError, match="name="):
        callable_id(partial)
    assert callable_id(partial, "explicit") == "explicit"


def test_module_name_keeps_ordinary_modules() -> None:
    assert module_name("pkg.mod") == "pkg.mod"


def test_module_name_maps_a_main_script_to_its_stem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    main = types.ModuleType("__main__")
    main.__file__ = str(tmp_path / "nightly_report.py")
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert module_name("__main__") == "nightly_report"


def test_module_name_maps_python_dash_m_to_the_spec_name(monkeypatch: pytest.MonkeyPatch) -> None:
    main = types.ModuleType("__main__")
    main.__file__ = "/somewhere/shop/jobs/orders.py"
    main.__spec__ = importlib.machinery.ModuleSpec("shop.jobs.orders", None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert module_name("__main__") == "shop.jobs.orders"


def test_module_name_of_an_interactive_main_stays_main(monkeypatch: pytest.MonkeyPatch) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert module_name("__main__") == "__main__"


def test_main_script_id_uses_the_script_stem(tmp_path: Path) -> None:
    (tmp_path / "orders.py").write_text(SCRIPT)
    assert run_python(["orders.py"], tmp_path).splitlines() == ["orders:fetch", "orders:flow", "orders:fetch"]


def test_main_script_id_agrees_with_importing_it_by_name(tmp_path: Path) -> None:
    (tmp_path / "orders.py").write_text(SCRIPT)
    imported = run_python(["-c", "import orders; print(orders.fetch.id); print(orders.flow.id)"], tmp_path)
    assert imported.splitlines() == ["orders:fetch", "orders:flow"]


def test_python_dash_m_uses_the_full_module_name(tmp_path: Path) -> None:
    package = tmp_path / "shop" / "jobs"
    package.mkdir(parents=True)
    (tmp_path / "shop" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "orders.py").write_text(SCRIPT)
    assert run_python(["-m", "shop.jobs.orders"], tmp_path).splitlines() == [
        "shop.jobs.orders:fetch",
        "shop.jobs.orders:flow",
        "shop.jobs.orders:fetch",
    ]


SELF_IMPORT = """
from werkfluss import step

@step
async def fetch() -> int:
    return 1

if __name__ == "__main__":
    import orders  # defines the same step again, as orders.fetch
    print(fetch.id, orders.fetch.id)
"""


def test_script_importing_itself_is_not_a_conflict(tmp_path: Path) -> None:
    (tmp_path / "orders.py").write_text(SELF_IMPORT)
    assert run_python(["orders.py"], tmp_path) == "orders:fetch orders:fetch"


def test_script_started_as_dot_slash_importing_itself_is_not_a_conflict(tmp_path: Path) -> None:
    (tmp_path / "orders.py").write_text(SELF_IMPORT)
    proc = subprocess.run(
        [sys.executable, "./orders.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert "already taken" not in proc.stderr
    assert proc.stdout.strip() == "orders:fetch orders:fetch"


# --- register ------------------------------------------------------------------------------------------------------


def test_registering_the_same_function_again_is_fine() -> None:
    ident = unique("same")
    register(ident, "step", top_level)
    register(ident, "step", top_level)
    first = step(name=ident)(top_level)
    second = step(name=ident)(top_level)
    assert first.id == second.id == ident


def test_another_function_claiming_an_id_is_a_conflict() -> None:
    ident = unique("clash")

    async def one() -> None:
        pass

    async def two() -> None:
        pass

    step(name=ident)(one)
    with pytest.raises(ConfigurationError) as info:
        step(name=ident)(two)
    message = str(info.value)
    assert repr(ident) in message
    assert f"{one.__code__.co_filename}:{one.__code__.co_firstlineno}" in message
    assert "name=" in message


def test_conflict_message_names_the_kind_of_the_holder() -> None:
    ident = unique("kind")

    async def body() -> None:
        pass

    workflow(name=ident)(body)
    with pytest.raises(ConfigurationError, match=r"step ID .* taken by a workflow defined at"):
        step(name=ident)(body)


def test_failed_registration_keeps_the_first_holder() -> None:
    ident = unique("keep")

    async def one() -> None:
        pass

    async def two() -> None:
        pass

    register(ident, "step", one)
    with pytest.raises(ConfigurationError):
        register(ident, "step", two)
    register(ident, "step", one)  # still held by `one`
    with pytest.raises(ConfigurationError):
        register(ident, "step", two)


# --- check_run_id --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "order-7", "user:42/charge", "ünïcödé", "x" * 200, "wf-0123456789abcdef"])
def test_valid_run_ids_are_returned_unchanged(good: str) -> None:
    assert check_run_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "a{b", "a}b", "{tag}", "with space", "tab\t", "new\nline", "nul\x00", "del\x7f", "x" * 201, "nbsp\u00a0"],
)
def test_invalid_run_ids_are_rejected_naming_the_value(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid run_id") as info:
        check_run_id(bad)
    assert repr(bad) in str(info.value)


def test_non_string_run_id_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="invalid run_id"):
        check_run_id(42)  # type: ignore[arg-type]


# --- derive_run_id -------------------------------------------------------------------------------------------------

WF = "shop.jobs:fulfil"
DERIVE = """
import sys
import types
from werkfluss._values import encode_call
from werkfluss._ids import derive_run_id
args = (7, {"b": 2, "a": 1}, frozenset({"x", "y", "z", "w"}))
print(derive_run_id(sys.argv[1], encode_call(sys.argv[1], args, {"k": "v", "j": [1.5, None]}, deterministic=True)))
"""


def derived(args: tuple[Any, ...], kwargs: dict[str, Any], workflow_id: str = WF) -> str:
    return derive_run_id(workflow_id, encode_call(workflow_id, args, kwargs, deterministic=True))


def test_derived_run_id_shape() -> None:
    run_id = derived((1,), {})
    short, digest = run_id.rsplit("-", 1)
    assert short == "fulfil"
    assert len(digest) == 24
    assert int(digest, 16) >= 0
    assert check_run_id(run_id) == run_id


def test_derived_run_id_is_stable_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    here = derived((7, {"b": 2, "a": 1}, frozenset({"x", "y", "z", "w"})), {"k": "v", "j": [1.5, None]})
    (tmp_path / "derive.py").write_text(DERIVE)
    for seed in ("0", "1", "12345"):
        assert run_python(["derive.py", WF], tmp_path, env={"PYTHONHASHSEED": seed}) == here


def test_derived_run_id_has_not_changed() -> None:
    """Existing runs are found again only if the derivation never changes: a golden value."""
    assert derived((7, {"b": 2, "a": 1}), {"k": "v"}) == "fulfil-8fe263b7fda922e67ad41b75"


def test_derived_run_id_differs_for_different_arguments() -> None:
    ids = {
        derived((1,), {}),
        derived((2,), {}),
        derived(("1",), {}),
        derived((1.0,), {}),
        derived((), {"x": 1}),
        derived((), {"y": 1}),
        derived(([1, 2],), {}),
        derived(([2, 1],), {}),
        derived((), {}),
    }
    assert len(ids) == 9


def test_derived_run_id_differs_for_different_workflows() -> None:
    assert derived((1,), {}, "a:flow") != derived((1,), {}, "b:flow")


def test_derived_run_id_ignores_dict_and_set_insertion_order() -> None:
    first = derived(({"a": 1, "b": {"c": 3, "d": 4}}, {"p", "q", "r"}), {"x": 1, "y": 2})
    second = derived(({"b": {"d": 4, "c": 3}, "a": 1}, {"r", "q", "p"}), {"y": 2, "x": 1})
    assert first == second


def test_derived_run_id_strips_braces_from_the_short_name() -> None:
    run_id = derived((), {}, "mod:{weird}")
    assert "{" not in run_id and "}" not in run_id
    assert run_id.startswith("weird-")


def test_derived_run_id_truncates_long_workflow_names() -> None:
    run_id = derived((), {}, "mod:" + "n" * 500)
    assert run_id == "n" * 60 + "-" + run_id.rsplit("-", 1)[1]
    assert len(run_id) == 60 + 1 + 24
