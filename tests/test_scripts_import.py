"""The measurement scripts the docs quote import names that exist: a module moved inside ea_local
leaves no script behind with a broken import. Read from their source, so no script runs."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").rglob("*.py"))


def ea_local_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every `from ea_local... import name` and `import ea_local...` in the file."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ea_local":
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "ea_local"]
    return out


def test_scripts_are_found():
    assert len(SCRIPTS) > 10 and any(p.name == "probe_trace.py" for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_script_imports_resolve(path: Path):
    for module, name in ea_local_imports(path):
        m = importlib.import_module(module)  # ModuleNotFoundError names the moved module
        if name is not None and not hasattr(m, name):
            importlib.import_module(f"{module}.{name}")  # a submodule imported by name
