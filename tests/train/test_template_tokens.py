"""lora.train_template_tokens: the chat template's turn tokens get trainable embedding rows (peft trainable tokens,
tied to the LM head), their gradient flows through chatforge's chunked loss, and the run loads merged."""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge.models.run import load_run
from chatforge.models.templates import template_token_ids
from tests.models.test_run import prepared_dataset, tiny_run


def test_template_token_rows_train_and_the_run_loads_with_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = prepared_dataset(tmp_path, tiny_model_dir)
    run = tiny_run(dataset, tiny_model_dir, tmp_path / "run", "lora", lr=1e-2, lora={"train_template_tokens": True})
    loaded = load_run(run)
    base = load_run(tiny_model_dir)
    ids = template_token_ids(loaded.tokenizer)
    assert ids, "the tiny tokenizer's gemma template writes <start_of_turn> and <end_of_turn>"
    trained = loaded.model.get_input_embeddings().weight
    original = base.model.get_input_embeddings().weight
    changed = (trained - original).abs().sum(-1) > 0
    assert changed[ids].all()                        # the turn tokens' rows moved ...
    assert changed.sum() == len(ids)                 # ... and no other row did
    head = loaded.model.get_output_embeddings().weight
    assert torch.equal(head[ids], trained[ids])      # tied: the LM head sees the same rows
