"""The data stage and the PII/records core read as the style guide asks: short files, imports at the top.

A file stays under ~400 lines (split along the seams its data has), and an import inside a function is only for a
heavy or optional extra listed here, with a `# lazy:` comment in that function saying why (its measured import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import chatforge

PACKAGE_ROOT = Path(chatforge.__file__).parent
CORE = PACKAGE_ROOT / "core"
FILES = sorted((PACKAGE_ROOT / "data").glob("*.py")) + sorted(CORE.glob("pii*.py")) + [CORE / "records.py"]
MAX_LINES = 400

LAZY_EXTRAS = {
    "matplotlib": "only the card's histogram needs it; pyplot takes ~2 s to import",
    "matplotlib.pyplot": "as above",
    "spellchecker": "optional extra chatforge[spell]",
    "pyarrow": "only parquet inputs need it; ~0.5 s to import",
    "pyarrow.parquet": "as above",
    "presidio_analyzer": "optional extra, only with person_names",
    "presidio_analyzer.nlp_engine": "as above",
    "chatforge.data.dedup": "datasketch pulls in scipy, ~2 s to import; only the dedup step needs it",
}


def _function_level_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, whether a '# lazy:' comment precedes it in its function) for imports inside functions."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found: dict[int, tuple[int, str, bool]] = {}
    for function in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                explained = any("# lazy:" in line for line in lines[function.lineno - 1 : node.lineno])
                for module in modules:
                    found.setdefault(node.lineno, (node.lineno, module, explained))
    return list(found.values())


def test_data_and_pii_modules_stay_under_400_lines() -> None:
    too_long = {path.name: n for path in FILES if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert too_long == {}


def test_imports_inside_functions_are_only_heavy_or_optional_extras_with_a_reason() -> None:
    problems = []
    for path in FILES:
        for line, module, explained in _function_level_imports(path):
            where = f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}"
            if module not in LAZY_EXTRAS:
                problems.append(f"{where}: imports {module} inside a function; move it to the top of the module")
            elif not explained:
                problems.append(f"{where}: lazy import of {module} without a '# lazy:' comment saying why")
    assert problems == []


def test_the_import_check_sees_a_lazy_import_and_its_comment(tmp_path: Path) -> None:
    """The check itself can fail: a stage module imported in a function is reported, a commented extra is explained."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from chatforge.data.fit import fit_records\n\n\n"
                       "def g():\n    # lazy: optional extra\n    import spellchecker\n")
    assert _function_level_imports(planted) == [(2, "chatforge.data.fit", False), (7, "spellchecker", True)]
