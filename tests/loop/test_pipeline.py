"""`chatforge run`: prepare -> train -> eval from a project file; a second call skips every stage, a changed source
reruns what depends on it, --force reruns one stage; `lineage` prints the chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatforge.config import ProjectConfig
from chatforge.pipeline import PipelineError, lineage_lines, run_project
from tests.train.chat_data import write_chat_jsonl


def project_file(root: Path, tiny_model_dir: Path) -> Path:
    write_chat_jsonl(root / "chats.jsonl", count=40)
    settings = {
        "data": {"sources": ["chats.jsonl"], "out": "out/dataset"},
        "prepare": {"fit": {"model": str(tiny_model_dir), "max_tokens": 128}},
        "train": {"model": str(tiny_model_dir), "out": "out/run", "max_steps": 2, "batch_size": 4, "threads": 1,
                  "max_length": 128, "eval_every": 100, "save_every": 100, "max_val_examples": 4},
        "eval": {"max_examples": 4, "generation": {"max_new_tokens": 6}, "bias": {"enabled": False}, "baseline": "none"},
    }
    path = root / "chatforge.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def run(path: Path, force: set[str] | None = None) -> dict[str, bool]:
    outcomes = run_project(ProjectConfig.load(path), base_dir=path.parent, force=force, log=lambda _m: None)
    return {o.stage: o.skipped for o in outcomes}


def test_second_run_skips_changed_source_reruns_and_lineage_shows_the_chain(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = project_file(tmp_path, tiny_model_dir)
    assert run(path) == {"prepare": False, "train": False, "eval": False}
    assert (tmp_path / "out/run/eval/test/metrics.json").is_file()
    assert run(path) == {"prepare": True, "train": True, "eval": True}
    assert run(path, force={"eval"}) == {"prepare": True, "train": True, "eval": False}

    with (tmp_path / "chats.jsonl").open("a") as handle:  # one more conversation: everything downstream reruns
        handle.write('{"messages": [{"role": "user", "content": "new question"}, {"role": "assistant", "content": "new answer"}]}\n')
    assert run(path) == {"prepare": False, "train": False, "eval": False}
    assert list(tmp_path.glob("out/run.replaced-*")), "the previous run is set aside, not deleted"

    lines = lineage_lines(tmp_path / "out/run")
    text = "\n".join(lines)
    assert str(tmp_path / "chats.jsonl") in text and "dataset" in text and "eval" in text
    assert lines[0].startswith("run ")


def test_run_refuses_a_project_without_sources(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="data.sources is empty"):
        run_project(ProjectConfig(), base_dir=tmp_path, log=lambda _m: None)
    with pytest.raises(PipelineError, match="unknown stage"):
        run_project(ProjectConfig(), base_dir=tmp_path, force={"deploy"}, log=lambda _m: None)
