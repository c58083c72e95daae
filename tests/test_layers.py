"""The three parts stay three parts: the engine (core/) imports no web framework and neither face; the HTTP API
(api/) and the pages (pages/, ui.py, ui_format.py) import the engine and never each other; no face writes
through the Store (every change goes through core.service). Read from the source with `ast`, so a new import
or a shortcut past the front door fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

ENGINE = sorted((ROOT / "core").glob("*.py"))
API = sorted((ROOT / "api").glob("*.py"))
PAGES = [*sorted((ROOT / "pages").glob("*.py")), ROOT / "ui.py", ROOT / "ui_format.py", ROOT / "ui_main.py"]


def imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (absolute imports; the project has no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
    return names


def top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: p.name)
def test_the_engine_imports_neither_face_nor_a_web_framework(path):
    assert top(imported(path)) & {"api", "pages", "ui", "ui_format", "ui_main", "app", "starlette", "streamlit",
                                   "uvicorn"} == set()


@pytest.mark.parametrize("path", API, ids=lambda p: p.name)
def test_the_api_imports_the_engine_and_never_the_pages(path):
    assert top(imported(path)) & {"pages", "ui", "ui_format", "ui_main", "app", "streamlit"} == set()


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_the_pages_import_the_engine_and_never_the_api(path):
    assert top(imported(path)) & {"api", "app", "starlette"} == set()


def store_write_methods() -> set[str]:
    """Store methods that write: they open a write transaction (`with self.write()`) or call one that does.
    Read from core/store.py."""
    tree = ast.parse((ROOT / "core" / "store.py").read_text(encoding="utf-8"))
    store = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Store")
    calls = {}
    for method in store.body:
        if isinstance(method, ast.FunctionDef):
            calls[method.name] = {n.func.attr for n in ast.walk(method) if isinstance(n, ast.Call)
                                  and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                                  and n.func.value.id == "self"}
    writers = {"write"}
    while True:
        more = {name for name, called in calls.items() if called & writers} - writers
        if not more:
            return writers - {"write", "migrate", "__init__"}
        writers |= more


def test_the_store_write_methods_are_known():
    # If this list shrinks to nothing the next test checks nothing: keep it honest.
    assert {"create_batch", "transition", "set_priority", "request_cancel", "retry", "add_server",
            "remove_server", "set_server_enabled"} <= store_write_methods()


@pytest.mark.parametrize("path", [*API, *PAGES], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_face_writes_through_the_store(path):
    writers = store_write_methods()
    calls = [(n.lineno, n.func.attr) for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in writers
             and "store" in ast.unparse(n.func.value).lower()]
    assert calls == [], f"{path.name} writes through the Store; call core.service instead"
