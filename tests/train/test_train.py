"""`chatforge train` on a tiny model: loss falls, early stopping fires, the run loads without chatforge, TensorBoard
holds scalars and histograms, and a killed run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatforge.config import EarlyStopping, FitConfig, PrepareConfig, TrainConfig
from chatforge.data.prepare import prepare
from chatforge.train.loop import train
from chatforge.train.monitor import read_metrics
from tests.train.chat_data import write_chat_jsonl


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    write_chat_jsonl(root / "chats.jsonl", count=120)
    prepare([root / "chats.jsonl"], root / "ds", PrepareConfig(fit=FitConfig(model=str(tiny_model_dir), max_tokens=128)))
    return root / "ds"


def tiny_config(dataset_dir: Path, model_dir: Path, out: Path, **changes: object) -> TrainConfig:
    settings: dict = dict(data=str(dataset_dir), model=str(model_dir), out=str(out), method="full", lr=3e-3,
                          batch_size=4, max_steps=24, eval_every=8, save_every=8, log_every=4, histogram_every=8,
                          threads=1, max_length=128, schedule="constant")
    settings.update(changes)
    return TrainConfig(**settings)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def test_full_fine_tune_loss_falls_and_run_loads_with_plain_transformers(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    report = train(tiny_config(dataset_dir, tiny_model_dir, tmp_path / "run"), log=lambda _m: None)
    losses = train_losses(report.run_dir)
    assert losses[24] < losses[4] - 0.5, losses
    val = [m["val/loss"] for m in read_metrics(report.run_dir) if "val/loss" in m]
    assert len(val) == 3 and val[-1] < val[0]
    model = AutoModelForCausalLM.from_pretrained(report.run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(report.run_dir / "model")
    assert tokenizer.chat_template == (report.run_dir / "chat_template.jinja").read_text()
    assert model.config.vocab_size == len(tokenizer)
    manifest = json.loads((report.run_dir / "manifest.json").read_text())
    assert manifest["lineage"]["dataset_manifest_sha256"] and manifest["lineage"]["base_model"]["kind"] == "hf_dir"
    assert manifest["outputs"]["kind"] == "full"


def test_tensorboard_has_scalars_and_histograms(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = train(tiny_config(dataset_dir, tiny_model_dir, tmp_path / "run", max_steps=8, method="lora"),
                   log=lambda _m: None)
    events = EventAccumulator(str(report.run_dir / "tb"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for scalar in ("train/loss", "train/lr", "train/grad_norm", "train/trained_tokens_per_s", "val/loss"):
        assert scalar in tags["scalars"], scalar
    assert any(t.startswith("weights/") and "lora_A" in t for t in tags["histograms"])
    assert any(t.startswith("grads/") for t in tags["histograms"])


def test_lora_run_loads_with_peft_and_merge_writes_a_full_model(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    adapter = train(tiny_config(dataset_dir, tiny_model_dir, tmp_path / "lora", method="lora", max_steps=4),
                    log=lambda _m: None)
    assert (adapter.run_dir / "model" / "adapter_config.json").exists()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter.run_dir / "model")
    merged = train(tiny_config(dataset_dir, tiny_model_dir, tmp_path / "merged", method="lora", max_steps=4, merge=True),
                   log=lambda _m: None)
    assert not (merged.run_dir / "model" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(merged.run_dir / "model")
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():  # same seed, same data: the merged model computes what base + adapter compute
        assert torch.allclose(peft_model(ids).logits, plain(ids).logits, atol=1e-4)


def test_early_stopping_fires_and_exports_the_best_checkpoint(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset_dir, tiny_model_dir, tmp_path / "run", max_steps=80, eval_every=4,
                      early_stopping=EarlyStopping(patience=2, min_delta=100.0))
    report = train(cfg, log=lambda _m: None)
    assert report.stopped_early and report.steps == 12  # best at step 4, then two evaluations without a 100 drop
    best = json.loads((report.run_dir / "checkpoints" / "best" / "state.json").read_text())
    assert best["step"] == 4
    first_val = [m["val/loss"] for m in read_metrics(report.run_dir) if "val/loss" in m][0]
    assert report.best_val_loss == pytest.approx(first_val, abs=1e-5)


def cli_train(args: list[str], **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "chatforge", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_resume_after_kill_matches_uninterrupted_run(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ["--data", str(dataset_dir), "--model", str(tiny_model_dir), "--method", "lora", "--max-steps", "24",
              "--save-every", "4", "--eval-every", "8", "--lr", "0.003", "--batch-size", "4"]
    whole = cli_train([*common, "--out", str(tmp_path / "whole")])
    output, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, output

    killed = cli_train([*common, "--out", str(tmp_path / "killed")])
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints / "step-00000012").exists():
        assert killed.poll() is None, killed.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model").exists()  # it really died before finishing

    resumed = cli_train([*common, "--out", str(tmp_path / "killed"), "--resume"])
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed from step-" in output
    expected, got = train_losses(tmp_path / "whole"), train_losses(tmp_path / "killed")
    assert sorted(got) == sorted(expected)  # metrics past the checkpoint were rewritten, not duplicated
    assert got[24] == pytest.approx(expected[24], rel=1e-4, abs=1e-5)  # tolerance: float reduction order only


def test_cli_dry_run_prints_an_estimate_and_trains_nothing(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    done = cli_train(["--data", str(dataset_dir), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"), "--dry-run"])
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output
    assert "estimate: ~" in output and "GiB peak" in output
    assert not (tmp_path / "r" / "model").exists()
    missing = cli_train(["--data", str(tmp_path / "nope"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r")])
    output, _ = missing.communicate(timeout=300)
    assert missing.returncode == 2 and "missing" in output and "Traceback" not in output


def test_torchrun_two_processes_match_one_process_with_gradient_accumulation(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    common = ["--data", str(dataset_dir), "--model", str(tiny_model_dir), "--method", "full", "--max-steps", "6",
              "--eval-every", "3", "--lr", "0.003", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "chatforge", "train", *common, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    single = cli_train([*common, "--grad-accum", "2", "--out", str(tmp_path / "single")])
    output, _ = single.communicate(timeout=600)
    assert single.returncode == 0, output
    ddp_losses, single_losses = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert sorted(ddp_losses) == sorted(single_losses)
    for step in single_losses:  # same global batches, token-weighted mean loss: same trajectory
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-4)
    assert (tmp_path / "ddp" / "model" / "config.json").exists()


def test_trained_model_stops_by_itself_and_the_untrained_base_does_not(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.train.chat_data import chat_pair

    report = train(tiny_config(dataset_dir, tiny_model_dir, tmp_path / "run", max_steps=60, eval_every=1000,
                               save_every=1000), log=lambda _m: None)
    tokenizer = AutoTokenizer.from_pretrained(report.run_dir / "model")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")

    def answers_ending_with_end_of_turn(model_path: Path) -> int:
        model = AutoModelForCausalLM.from_pretrained(model_path)
        stopped = 0
        for index in range(5):
            prompt = tokenizer.apply_chat_template([chat_pair(index)[0]], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            output = model.generate(**prompt, max_new_tokens=40, do_sample=False,
                                    eos_token_id=[end_of_turn, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[0, prompt["input_ids"].shape[1]:].tolist()
            stopped += new_tokens[-1] == end_of_turn and len(new_tokens) < 40
        return stopped

    assert answers_ending_with_end_of_turn(report.run_dir / "model") == 5
    assert answers_ending_with_end_of_turn(tiny_model_dir) == 0
