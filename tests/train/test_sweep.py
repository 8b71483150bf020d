"""`chatforge sweep` on a tiny model: every combination trains once, the leaderboard ranks them by val loss, and
`--resume` runs only what is missing (failed trials, and a trial whose process was killed, from its checkpoint)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.config import FitConfig, PrepareConfig, ProjectConfig, TrainConfig
from chatforge.data.prepare import prepare
from chatforge.train.monitor import read_metrics
from chatforge.train.sweep import SweepError, SweepReport, grid_combinations, sweep, validate_grid
from tests.train.chat_data import write_chat_jsonl


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("sweep-data")
    write_chat_jsonl(root / "chats.jsonl", count=60)
    fit_to_tiny_model = PrepareConfig(fit=FitConfig(model=str(tiny_model_dir), max_tokens=128))
    prepare([root / "chats.jsonl"], root / "ds", fit_to_tiny_model)
    return root / "ds"


def tiny_base(dataset_dir: Path, model_dir: Path, **changes: object) -> TrainConfig:
    settings: dict = dict(data=str(dataset_dir), model=str(model_dir), method="lora", lr=3e-3, batch_size=4,
                          max_steps=4, eval_every=2, save_every=2, log_every=2, histogram_every=1000, threads=1,
                          max_length=128, max_val_examples=8, schedule="constant")
    settings.update(changes)
    return TrainConfig(**settings)


def quiet(_message: str) -> None:
    pass


def file_stamps(run_dirs: list[Path]) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for run_dir in run_dirs for path in run_dir.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path, tiny_model_dir: Path) -> SweepReport:
    out = tmp_path_factory.mktemp("sweeps") / "lr-x-rank"
    return sweep(tiny_base(dataset_dir, tiny_model_dir), {"lr": [3e-3, 1e-5], "lora.r": [2, 4]}, out, log=quiet)


def test_grid_combinations_cover_every_value_with_the_first_key_slowest() -> None:
    combos = grid_combinations({"lr": [1e-4, 3e-4], "lora.r": [8, 16], "optimizer": ["sgd"]})
    assert combos == [
        {"lr": 1e-4, "lora.r": 8, "optimizer": "sgd"}, {"lr": 1e-4, "lora.r": 16, "optimizer": "sgd"},
        {"lr": 3e-4, "lora.r": 8, "optimizer": "sgd"}, {"lr": 3e-4, "lora.r": 16, "optimizer": "sgd"},
    ]


def test_the_sweep_block_of_chatforge_yaml_becomes_a_typed_grid(tmp_path: Path) -> None:
    yaml_text = "sweep:\n  lr: [1e-4, 3.0e-4]\n  lora.r: [8, 16]\n  optimizer: [adamw, sgd]\n"
    (tmp_path / "chatforge.yaml").write_text(yaml_text)
    project = ProjectConfig.load(tmp_path / "chatforge.yaml")
    grid = validate_grid(project.train, project.sweep)  # YAML reads 1e-4 as text; the grid holds the float
    assert grid == {"lr": [1e-4, 3e-4], "lora.r": [8, 16], "optimizer": ["adamw", "sgd"]}
    assert len(grid_combinations(grid)) == 8


@pytest.mark.parametrize(("grid", "message"), [
    ({"lrr": [1e-4]}, "sweep.lrr: not a train setting; did you mean lr?"),
    ({"lora.rank": [8]}, "sweep.lora.rank: not a train setting"),
    ({"lr": []}, "sweep.lr: expected a non-empty list"),
    ({"lr": [1e-4, -1.0]}, "sweep.lr: -1.0 is not a valid value"),
    ({"out": ["a", "b"]}, "sweep.out: every trial gets its own run directory"),
    ({}, "sweep: nothing to sweep"),
])
def test_a_bad_sweep_block_is_rejected_by_key_before_anything_runs(grid: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="^" + re.escape(message)):
        sweep(TrainConfig(data="ds", model="m"), grid, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_two_by_two_grid_trains_four_trials_and_ranks_them_by_val_loss(two_by_two: SweepReport) -> None:
    out = two_by_two.out_dir
    assert (two_by_two.done, two_by_two.skipped, two_by_two.failed) == (4, 0, 0)
    losses = [row["best_val_loss"] for row in two_by_two.trials]
    assert all(row["state"] == "complete" and row["steps"] == 4 for row in two_by_two.trials)
    assert losses == sorted(losses) and two_by_two.best == two_by_two.trials[0]
    assert two_by_two.best["params"]["lr"] == 3e-3  # learning at all beats barely moving
    run_dirs = sorted(p.name for p in out.glob("trial-*"))
    assert [name.split("-")[1] for name in run_dirs] == ["0", "1", "2", "3"]
    for row in two_by_two.trials:  # each trial trained with its own values
        saved = json.loads((Path(row["run_dir"]) / "model" / "adapter_config.json").read_text())
        assert saved["r"] == row["params"]["lora.r"]
        val = [m["val/loss"] for m in read_metrics(Path(row["run_dir"])) if "val/loss" in m]
        assert min(val) == pytest.approx(row["best_val_loss"], abs=1e-5)
    board = json.loads((out / "leaderboard.json").read_text())
    assert [row["trial"] for row in board["trials"]] == [row["trial"] for row in two_by_two.trials]
    table = (out / "leaderboard.md").read_text()
    assert "| rank | trial | lr | lora.r | best val loss |" in table
    assert table.index(f"| 1 | {two_by_two.best['trial']} |") < table.index("| 4 |")
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sweep" and manifest["config"]["grid"] == {"lr": [3e-3, 1e-5], "lora.r": [2, 4]}
    assert manifest["counts"] == {"combinations": 4, "skipped": 0, "done": 4, "failed": 0, "running": 0, "pending": 0}


def test_resume_after_a_finished_sweep_trains_nothing(two_by_two: SweepReport, dataset_dir: Path,
                                                       tiny_model_dir: Path) -> None:
    run_dirs = [Path(row["run_dir"]) for row in two_by_two.trials]
    before = file_stamps(run_dirs)
    grid = {"lr": [3e-3, 1e-5], "lora.r": [2, 4]}
    with pytest.raises(SweepError, match="already holds 4 trials; pass --resume"):
        sweep(tiny_base(dataset_dir, tiny_model_dir), grid, two_by_two.out_dir, log=quiet)
    again = sweep(tiny_base(dataset_dir, tiny_model_dir), grid, two_by_two.out_dir, resume=True, log=quiet)
    assert (again.skipped, again.done, again.failed) == (4, 0, 0)
    assert again.trials == two_by_two.trials
    assert file_stamps(run_dirs) == before
    with pytest.raises(SweepError, match=r"train\.max_steps changed"):
        sweep(tiny_base(dataset_dir, tiny_model_dir, max_steps=6), grid, two_by_two.out_dir, resume=True, log=quiet)


def test_a_failed_trial_does_not_stop_the_sweep_and_resume_reruns_only_it(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    late_dataset = tmp_path / "late-ds"  # missing on the first run: that trial fails
    grid = {"data": [str(dataset_dir), str(late_dataset)]}
    first = sweep(tiny_base(dataset_dir, tiny_model_dir), grid, tmp_path / "out", log=quiet)
    assert (first.done, first.failed) == (1, 1)
    good, bad = first.trials
    assert good["state"] == "complete" and good["params"]["data"] == str(dataset_dir)
    assert bad["state"] == "failed" and "TrainError" in bad["error"] and "late-ds" in bad["error"]
    assert "TrainError" in (tmp_path / "out" / "leaderboard.md").read_text()
    before = file_stamps([Path(good["run_dir"])])

    shutil.copytree(dataset_dir, late_dataset)
    resumed = sweep(tiny_base(dataset_dir, tiny_model_dir), grid, tmp_path / "out", resume=True, log=quiet)
    assert (resumed.skipped, resumed.done, resumed.failed) == (1, 1, 0)
    assert [row["state"] for row in resumed.trials] == ["complete", "complete"]
    assert {row["attempts"] for row in resumed.trials} == {1, 2}
    assert file_stamps([Path(good["run_dir"])]) == before


KILL_AT_STEP_4_OF_SECOND_TRIAL = """
import os, signal, sys
from pathlib import Path
from chatforge.config import TrainConfig
from chatforge.train.sweep import sweep

started = []
def log(message):
    print(message, flush=True)
    if message.startswith("trial ") and "->" in message:
        started.append(message)
    if len(started) == 2 and ": step 4: val loss" in message:
        os.kill(os.getpid(), signal.SIGKILL)  # after the step-2 checkpoint, before the step-4 one

sweep(TrainConfig.model_validate_json(sys.argv[1]), {"lr": [3e-3, 1e-3]}, Path(sys.argv[2]), log=log)
"""


def test_a_killed_sweep_resumes_the_interrupted_trial_from_its_checkpoint(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = tiny_base(dataset_dir, tiny_model_dir, max_steps=6)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4_OF_SECOND_TRIAL,
                             base.model_dump_json(), str(tmp_path / "out")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    finished_dir = next(p for p in (tmp_path / "out").glob("trial-*") if (p / "model").exists())
    before = file_stamps([finished_dir])

    messages: list[str] = []
    resumed = sweep(base, {"lr": [3e-3, 1e-3]}, tmp_path / "out", resume=True, log=messages.append)
    assert (resumed.skipped, resumed.done, resumed.failed) == (1, 1, 0)
    assert any("was interrupted" in m for m in messages) and any("resumed from step-00000002" in m for m in messages)
    interrupted = next(row for row in resumed.trials if Path(row["run_dir"]) != finished_dir)
    steps = [m["step"] for m in read_metrics(Path(interrupted["run_dir"])) if "val/loss" in m]
    assert steps == [2, 4, 6] and interrupted["steps"] == 6 and interrupted["attempts"] == 2
    assert file_stamps([finished_dir]) == before
