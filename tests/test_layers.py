"""The package's layers: every module imports only from its own layer or the layers before it.

    errors -> dist -> progress -> model -> saliency -> config -> tasks -> eval -> rl -> toy -> experiments/, benchmarks/

Every ``import`` statement is read, top level and inside functions alike, so a local import cannot hide a cycle.
``atmanrl/__init__.py`` stands above all layers (it registers the toy world's warm start with the model loader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "atmanrl"
LAYERS = ["errors", "dist", "progress", "model", "saliency", "config", "tasks", "eval", "rl", "toy"]


def _layer(module: str) -> str:
    """``atmanrl.rl.trainer`` -> ``rl``."""
    return module.split(".")[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every atmanrl import in ``path``, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "atmanrl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "atmanrl":
                continue
            if module == "atmanrl":  # from atmanrl import dist, rl, ...: each name is a module
                found += [(node.lineno, f"atmanrl.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_package_is_a_known_layer():
    for path in _modules():
        assert _layer(_module_name(path)) in LAYERS, f"{path}: not in the layer list {LAYERS}; add it in its place"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path):
    here = LAYERS.index(_layer(_module_name(path)))
    for line, module in _imports(path):
        assert module != "atmanrl", f"{path}:{line} imports the package root, which stands above every layer"
        there = _layer(module)
        assert there in LAYERS, f"{path}:{line} imports {module}, which is in no layer"
        assert LAYERS.index(there) <= here, (
            f"{path}:{line} imports {module}: the {_layer(_module_name(path))} layer may only import "
            f"{', '.join(LAYERS[:here + 1])}")


def test_the_checker_catches_an_upward_import(tmp_path):
    """The test above can fail: a model module that imports the toy package is reported."""
    bad = PACKAGE / "model" / "_layering_probe.py"
    bad.write_text("def f():\n    from atmanrl.toy.sft import sft_model_dir\n    from ..rl import trainer\n")
    try:
        found = [m for _, m in _imports(bad)]
        assert found == ["atmanrl.toy.sft", "atmanrl.rl"]
        assert all(LAYERS.index(_layer(m)) > LAYERS.index("model") for m in found)
    finally:
        bad.unlink()


def test_scripts_are_not_libraries():
    """No library module edits sys.path; no script reaches a sibling script through it; benchmarks reach into
    tests/ for the shared references (tests/references.py) only, never for a test module."""
    for path in _modules():
        assert "sys.path" not in path.read_text(encoding="utf-8"), f"{path} edits sys.path"
    for path in (ROOT / "experiments").rglob("*.py"):
        assert "sys.path" not in path.read_text(encoding="utf-8"), (
            f"{path} imports through sys.path: move what it shares into the package")
    for path in (ROOT / "benchmarks").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            assert "sys.path" not in line or '"tests"' in line, f"{path}: {line.strip()}"
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("test"):
                raise AssertionError(f"{path}:{node.lineno} imports {node.module}: share it via tests/references.py")
