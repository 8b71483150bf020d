"""`load_run`: adapter, full, merged and base models load to the same logits as loading them by hand, with the
template's stop tokens; anything else is refused with a message that names the path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatforge.config import FitConfig, PrepareConfig, TrainConfig
from chatforge.data.prepare import prepare
from chatforge.models.run import find_run, forward_step, load_run
from chatforge.models.templates import GEMMA_TEMPLATE
from chatforge.train.loop import train
from tests.train.chat_data import write_chat_jsonl

PROMPT_IDS = torch.tensor([[2, 4, 40, 41, 42, 43, 5, 4, 50]])  # <bos><start_of_turn>... as the template writes
END_OF_TURN_ID, EOS_ID = 5, 1


def prepared_dataset(root: Path, model_dir: Path) -> Path:
    """A small prepared dataset (40 patterned chats) under root/ds."""
    write_chat_jsonl(root / "chats.jsonl", count=40)
    prepare([root / "chats.jsonl"], root / "ds", PrepareConfig(fit=FitConfig(model=str(model_dir), max_tokens=128)),
            log=lambda _m: None)
    return root / "ds"


def tiny_run(
    dataset: Path, base: Path, out: Path, method: str, seed: int = 0, lr: float = 3e-3, **changes: object
) -> Path:
    """A 3-step run (about a second on one thread); different seeds or rates give different weights."""
    settings: dict = dict(data=str(dataset), model=str(base), out=str(out), method=method, seed=seed, lr=lr,
                          batch_size=4, max_steps=3, eval_every=100, save_every=100, threads=1, max_length=128,
                          max_val_examples=4, schedule="constant")
    settings.update(changes)
    return train(TrainConfig(**settings), log=lambda _m: None).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("load-run")
    dataset = prepared_dataset(root, tiny_model_dir)
    return {
        "adapter": tiny_run(dataset, tiny_model_dir, root / "adapter", "lora", lr=1e-2),
        "full": tiny_run(dataset, tiny_model_dir, root / "full", "full"),
        "merged": tiny_run(dataset, tiny_model_dir, root / "merged", "lora", lr=1e-2, merge=True),
    }


def logits_of(model: torch.nn.Module, ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_adapter_run_loads_merged_to_the_logits_of_base_plus_peft(runs: dict[str, Path], tiny_model_dir: Path) -> None:
    from peft import PeftModel

    by_hand = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), runs["adapter"] / "model")
    by_hand.eval()
    loaded = load_run(runs["adapter"])
    assert loaded.kind == "adapter" and loaded.run_dir == runs["adapter"]
    assert not loaded.model.training and not hasattr(loaded.model, "peft_config")  # merged: a plain transformers model
    assert loaded.stop_token_ids == [END_OF_TURN_ID, EOS_ID]
    assert loaded.tokenizer.chat_template == (runs["adapter"] / "chat_template.jinja").read_text()
    expected = logits_of(by_hand)
    assert not torch.allclose(expected, logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), atol=1e-4)
    assert torch.allclose(logits_of(loaded.model), expected, atol=1e-5)
    unmerged = load_run(runs["adapter"] / "model", merge_adapter=False)  # RUN/model names the same run
    assert unmerged.kind == "adapter" and unmerged.run_dir == runs["adapter"] and hasattr(unmerged.model, "peft_config")
    assert torch.allclose(logits_of(unmerged.model), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["full", "merged"])
def test_full_and_merged_runs_load_to_the_logits_of_plain_transformers(runs: dict[str, Path], name: str) -> None:
    loaded = load_run(runs[name])
    assert loaded.kind == "full" and loaded.run_dir == runs[name]
    assert loaded.model.config.use_cache  # saved off by training; decoding wants it
    by_hand = AutoModelForCausalLM.from_pretrained(runs[name] / "model")
    assert torch.allclose(logits_of(loaded.model), logits_of(by_hand), atol=1e-6)


def test_base_model_dir_loads_as_a_baseline_with_its_stop_tokens(tiny_model_dir: Path) -> None:
    loaded = load_run(tiny_model_dir)
    assert loaded.kind == "base" and loaded.run_dir is None
    assert loaded.stop_token_ids == [END_OF_TURN_ID, EOS_ID]
    by_hand = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.allclose(logits_of(loaded.model), logits_of(by_hand), atol=1e-6)


def test_base_model_without_a_chat_template_gets_the_one_its_vocabulary_fits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bare = Path(shutil.copytree(tiny_model_dir, tmp_path / "bare"))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_run(str(bare))
    assert loaded.tokenizer.chat_template == GEMMA_TEMPLATE
    assert loaded.stop_token_ids == [END_OF_TURN_ID, EOS_ID]


@pytest.mark.parametrize("merge_adapter", [True, False])
def test_forward_step_decodes_incrementally_like_a_full_forward(runs: dict[str, Path], merge_adapter: bool) -> None:
    model = load_run(runs["adapter"], merge_adapter=merge_adapter).model
    with torch.no_grad():
        logits, cache = forward_step(model, PROMPT_IDS[:, :5])
        for end in range(6, PROMPT_IDS.shape[1] + 1):
            logits, cache = forward_step(model, PROMPT_IDS[:, end - 1 : end], cache)
            assert torch.allclose(logits[:, -1], logits_of(model, PROMPT_IDS[:, :end])[:, -1], atol=1e-5), end


def test_a_dir_that_is_neither_run_nor_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert find_run(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a finished chatforge run"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_run(tmp_path / "missing" / "run")


def test_adapter_whose_base_was_removed_names_the_missing_base(runs: dict[str, Path], tmp_path: Path) -> None:
    moved = Path(shutil.copytree(runs["adapter"], tmp_path / "moved",
                                 ignore=shutil.ignore_patterns("checkpoints", "tb")))
    config_path = moved / "model" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_path.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="gone does not exist"):
        load_run(moved)
