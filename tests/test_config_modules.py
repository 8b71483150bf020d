"""The config is split along its seams (shared base, serve section, the rest) and still imports as one module:
`from chatforge.config import X` works for every X the code, tests, benchmarks and scripts import today."""

from __future__ import annotations

import ast
from pathlib import Path

import chatforge
import chatforge.config
import chatforge.config_base
import chatforge.config_serve

REPO_ROOT = Path(chatforge.__file__).parent.parent
CONFIG_MODULES = ("config.py", "config_base.py", "config_serve.py")
MAX_LINES = 400


def _names_imported_from_config() -> set[tuple[str, str]]:
    """(file, name) for every `from chatforge.config import name` in the repository's Python files."""
    found = set()
    for folder in ("chatforge", "tests", "benchmarks", "scripts"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.module == "chatforge.config":
                    found |= {(str(path.relative_to(REPO_ROOT)), alias.name) for alias in node.names}
    return found


def test_every_name_imported_from_chatforge_config_is_still_there() -> None:
    imported = _names_imported_from_config()
    assert {name for _, name in imported} >= {"ServeConfig", "OAuthConfig", "SafeguardsConfig", "PiiConfig",
                                               "PII_TYPES", "check_device_spec", "TrainConfig", "merge_overrides"}
    missing = sorted(f"{file}: {name}" for file, name in imported if not hasattr(chatforge.config, name))
    assert missing == []
    assert set(chatforge.config.__all__) <= set(dir(chatforge.config))


def test_the_serve_section_and_the_base_are_one_class_each_wherever_imported() -> None:
    assert chatforge.config.ServeConfig is chatforge.config_serve.ServeConfig
    assert chatforge.config.PiiConfig is chatforge.config_base.PiiConfig is chatforge.config_serve.PiiConfig
    assert isinstance(chatforge.config.ProjectConfig().serve, chatforge.config_serve.ServeConfig)
    assert "oauth:" in chatforge.config.starter_yaml() and "safeguards:" in chatforge.config.starter_yaml()


def test_config_modules_stay_under_the_size_limit() -> None:
    sizes = {name: len((REPO_ROOT / "chatforge" / name).read_text(encoding="utf-8").splitlines())
             for name in CONFIG_MODULES}
    assert all(lines <= MAX_LINES for lines in sizes.values()), sizes
