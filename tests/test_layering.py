"""Which part may import which: the API and `shared/` never the worker; the engine (`worker/engine/`) nothing of
the worker outside itself, so that it stays a library the worker configures."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: folder -> the module prefixes no file under it may import
FORBIDDEN = {
    "api": ("worker",),
    "shared": ("worker", "api"),
    "worker/engine": ("worker", "api"),
}
#: what an entry of FORBIDDEN may import all the same (its own package)
ALLOWED = {"worker/engine": ("worker.engine",)}


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at any depth (inside functions too), as absolute names."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def violations(folder: str) -> list[str]:
    allowed = ALLOWED.get(folder, ())
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in imported_modules(path):
            if any(module == own or module.startswith(own + ".") for own in allowed):
                continue
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_part_imports_what_sits_above_it(folder):
    assert violations(folder) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "engine.py"
    source.write_text("def f():\n    from worker.settings import EngineSettings\n")
    assert imported_modules(source) == ["worker.settings"]
