"""Shared fixtures: tiny tokenizers and models built once per test session (seconds, no network), and the
PostgreSQL fixtures of tests/serve/postgres.py (`postgres_server`, `database_url`) for every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.serve.postgres"]  # fixtures postgres_server, database_url (SQLite, then PostgreSQL)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", tiny_tokenizer_dir)
