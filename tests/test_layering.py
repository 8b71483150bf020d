"""The package's layering, checked from the source: stages are peers over a shared core.

`data`, `train`, `evaluate` and `serve` never import each other's modules (what two stages share lives in
`chatforge.core`, `chatforge.models`, `config`, `manifest` or `device`), and the core never imports a stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chatforge

PACKAGE_ROOT = Path(chatforge.__file__).parent
STAGES = ("data", "train", "evaluate", "serve")
CORE = ("core", "models")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in `path`, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    problems = []
    for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
        for line, module in _imported_modules(path):
            parts = module.split(".")
            if parts[0] == "chatforge" and len(parts) > 1 and parts[1] in forbidden:
                problems.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{line} imports {module}")
    return sorted(set(problems))


def test_no_stage_imports_another_stage() -> None:
    problems = []
    for stage in STAGES:
        problems += _violations(stage, tuple(other for other in STAGES if other != stage))
    assert problems == []


def test_the_shared_core_imports_no_stage() -> None:
    problems = []
    for package in CORE:
        problems += _violations(package, STAGES)
    assert problems == []


def test_the_checker_sees_a_cross_stage_import(tmp_path: Path) -> None:
    """The check itself can fail: a planted cross-stage import is reported with its line."""
    planted = tmp_path / "planted.py"
    planted.write_text("import os\n\ndef f():\n    from chatforge.train.batches import plan_batches\n")
    assert (4, "chatforge.train.batches") in _imported_modules(planted)
