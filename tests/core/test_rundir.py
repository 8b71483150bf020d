"""RunDir: the one owner of a run directory's names, and the typed read of RUN/config.yaml."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import yaml

import chatforge
from chatforge.config import EvalConfig, LoraSettings, TrainConfig
from chatforge.core.rundir import RunDir, RunDirError
from chatforge.evaluate.run_eval import EvalError, evaluate_run

PACKAGE_ROOT = Path(chatforge.__file__).parent


def test_layout_names_are_the_ones_on_disk(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r1")
    root = tmp_path / "r1"
    assert run.model_dir == root / "model"
    assert run.config_file == root / "config.yaml"
    assert run.template_file == root / "chat_template.jinja"
    assert run.checkpoints_dir == root / "checkpoints"
    assert run.best_checkpoint == root / "checkpoints" / "best"
    assert run.metrics_file == root / "metrics.jsonl"
    assert run.tensorboard_dir == root / "tb"
    assert run.manifest_file == root / "manifest.json"
    assert run.eval_dir("test") == root / "eval" / "test"
    assert run.export_dir("gguf") == root / "exports" / "gguf"
    assert run.ensemble_file == root / "ensemble.json"
    assert run.ensemble_tokenizer_dir == root / "tokenizer"
    assert RunDir.is_eval_dir(root / "eval" / "test") and not RunDir.is_eval_dir(root / "exports" / "test")
    assert RunDir(str(root)) == run  # a str path is the same run


def test_train_config_round_trips_typed(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    written = TrainConfig(data="data/ds", model="tiny", max_length=256, train_on="all", lora=LoraSettings(r=4))
    run.write_train_config(written)
    assert list(yaml.safe_load(run.config_file.read_text())) == ["train"]  # the file format users already have
    read = run.train_config()
    assert isinstance(read, TrainConfig)
    assert read == written and read.lora.r == 4 and read.max_length == 256


def test_an_ensemble_reads_its_first_members_config(tmp_path: Path) -> None:
    first, second = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    for member, length in ((first, 128), (second, 512)):
        member.path.mkdir()
        member.write_train_config(TrainConfig(max_length=length))
    ensemble = RunDir(tmp_path / "ens")
    ensemble.path.mkdir()
    ensemble.write_ensemble_spec({"method": "probability_average", "members": [
        {"run": str(first.path), "weight": 0.5}, {"run": str(second.path), "weight": 0.5}]})
    assert ensemble.is_ensemble()
    assert ensemble.train_config().max_length == 128


def test_a_missing_config_names_the_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match=r"config\.yaml: missing"):
        run.train_config()
    assert run.train_config_or_none() is None  # a soup has none


@pytest.mark.parametrize(("text", "expected"), [
    ("train: [unclosed\n", r"config\.yaml:2: not valid YAML \(expected ',' or '\]', but got '<stream end>'\)"),
    ("- just a list\n", r"config\.yaml: expected a `train:` section"),
    ("prepare: {}\n", r"config\.yaml: expected a `train:` section"),
    ("train:\n  max_length: lots\n", r"config\.yaml: train: max_length: "),
    ("train:\n  no_such_option: 1\n", r"config\.yaml: train: no_such_option: "),
])
def test_an_invalid_config_names_the_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    run = RunDir(tmp_path)
    run.config_file.write_text(text)
    with pytest.raises(RunDirError, match=expected) as caught:
        run.train_config()
    assert str(caught.value).startswith(str(run.config_file)) and "\n" not in str(caught.value)


def test_an_ensemble_with_a_missing_member_says_which(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.ensemble_file.write_text(json.dumps({"members": [{"run": str(tmp_path / "gone"), "weight": 1}]}))
    with pytest.raises(FileNotFoundError, match=r"ensemble\.json: member run .*gone does not exist"):
        run.train_config()


def test_eval_metrics_files_are_oldest_first(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for name, mtime in (("new", 2_000_000_000), ("old", 1_000_000_000)):
        run.eval_dir(name).mkdir(parents=True)
        path = run.eval_dir(name) / RunDir.EVAL_METRICS_FILE
        path.write_text("{}")
        os.utime(path, (mtime, mtime))
    assert [p.parent.name for p in run.eval_metrics_files()] == ["old", "new"]


LAYOUT_NAMES = {"model", "config.yaml", "chat_template.jinja", "checkpoints", "best", "metrics.jsonl", "tb", "eval",
                "exports", "ensemble.json", "tokenizer", "metrics.json"}


def _path_joins_of_layout_names(path: Path, root: Path = PACKAGE_ROOT.parent) -> list[str]:
    """`x / "model"`-style joins of a layout name: how a run path was spelled before RunDir owned it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                and node.right.value in LAYOUT_NAMES):
            found.append(f"{path.relative_to(root)}:{node.lineno} / {node.right.value!r}")
    return found


def test_no_module_but_rundir_joins_a_run_layout_name() -> None:
    problems = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if path.name != "rundir.py":
            problems += _path_joins_of_layout_names(path)
    assert problems == []


def test_the_join_check_sees_a_planted_join(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('from pathlib import Path\n\nrun = Path("r")\nmodel = run / "model"\n')
    assert _path_joins_of_layout_names(planted, tmp_path) == ["planted.py:4 / 'model'"]


def test_eval_of_a_run_with_a_broken_config_names_the_file(tmp_path: Path) -> None:
    """Before RunDir, eval read config.yaml as a dict and failed with an AttributeError on a non-mapping file."""
    run = RunDir(tmp_path / "r1")
    run.model_dir.mkdir(parents=True)
    run.config_file.write_text("- not: the train section\n")
    with pytest.raises(EvalError, match=r"r1/config\.yaml: expected a `train:` section"):
        evaluate_run(run.path, EvalConfig())
