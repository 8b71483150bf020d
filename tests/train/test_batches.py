"""Answers-only masks, and packing that changes nothing: a packed row gives each conversation's own losses."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from chatforge.core.examples import IGNORE, Example, collate, tokenize_conversation, tokenize_records
from chatforge.core.loss import CausalLMLoss
from chatforge.train.batches import pack_examples, plan_batches
from chatforge.train.model import load_base_model

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Click forgot password."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_answers_only_mask_covers_answers_and_end_of_turn(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    example = tokenize_conversation(tokenizer, CONVERSATION, "assistant", 512)
    text = trained_text(tokenizer, example)
    assert "Click forgot password.<end_of_turn>" in text and "You are welcome.<end_of_turn>" in text
    assert "reset" not in text and "Be brief" not in text and "Thanks" not in text
    last = trained_text(tokenizer, tokenize_conversation(tokenizer, CONVERSATION, "last_assistant", 512))
    assert "Click" not in last and "You are welcome.<end_of_turn>" in last
    everything = tokenize_conversation(tokenizer, CONVERSATION, "all", 512)
    assert everything.labels[0] == IGNORE and everything.trained_tokens == len(everything.input_ids) - 1


def test_examples_cut_before_any_answer_are_left_out(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    records = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "word " * 200},
                                                         {"role": "assistant", "content": "ok"}]}]
    examples = tokenize_records(records, tokenizer, "assistant", 64)
    assert len(examples) == 1


def test_packing_fills_bins_without_exceeding_max_length() -> None:

    examples = [Example(list(range(n)), list(range(n))) for n in (60, 50, 40, 30, 20, 10)]
    bins = pack_examples(examples, 100)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(len(examples[i].input_ids) for i in b) <= 100 for b in bins)
    assert len(bins) == 3
    plan = plan_batches(examples, batch_size=2, max_length=100, packing=True, seed=1, epoch=0)
    assert plan == plan_batches(examples, batch_size=2, max_length=100, packing=True, seed=1, epoch=0)


def test_packed_sequence_gives_the_same_per_token_losses_as_each_conversation_alone(
    tiny_tokenizer_dir: Path, tiny_model_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = load_base_model(tiny_model_dir, torch.float32).eval()
    loss_model = CausalLMLoss(model, chunk_size=16)
    conversations = [
        CONVERSATION,
        [{"role": "user", "content": "What is the price?"}, {"role": "assistant", "content": "Ten euros a month."}],
        [{"role": "user", "content": "Is the outage fixed?"}, {"role": "assistant", "content": "Yes, since noon."}],
    ]
    examples = [tokenize_conversation(tokenizer, c, "assistant", 256) for c in conversations]
    with torch.no_grad():
        alone = [loss_model(**collate([[i]], examples, tokenizer.pad_token_id, packing=False)) for i in range(3)]
        packed = loss_model(**collate([[0, 1, 2]], examples, tokenizer.pad_token_id, packing=True))
        # A packed row next to a shorter padded one: padding must not change anything either.
        two_rows = loss_model(**collate([[0, 1], [2]], examples, tokenizer.pad_token_id, packing=True))
        # The same three with attention across them (one plain sequence) must differ: the test can fail.
        leaky = collate([[0, 1, 2]], examples, tokenizer.pad_token_id, packing=True)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
        leaky_loss = loss_model(**leaky)
    total_alone = sum(float(a[0]) for a in alone)
    assert int(packed[1]) == sum(int(a[1]) for a in alone)
    assert abs(float(packed[0]) - total_alone) < 1e-3 * max(1.0, total_alone)
    assert abs(float(two_rows[0]) - total_alone) < 1e-3 * max(1.0, total_alone)
    assert abs(float(leaky_loss[0]) - total_alone) > 1e-3


def test_per_token_losses_of_packed_row_match_alone(tiny_tokenizer_dir: Path, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = load_base_model(tiny_model_dir, torch.float32).eval()
    first = tokenize_conversation(tokenizer, CONVERSATION, "assistant", 256)
    second = tokenize_conversation(tokenizer, CONVERSATION[1:3], "assistant", 256)
    with torch.no_grad():
        def token_losses(batch):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
            targets = batch["labels"][0, 1:]
            keep = targets != IGNORE
            return torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")

        packed = token_losses(collate([[0, 1]], [first, second], tokenizer.pad_token_id, packing=True))
        separate = torch.cat([token_losses(collate([[0]], [first, second], tokenizer.pad_token_id, packing=False)),
                              token_losses(collate([[1]], [first, second], tokenizer.pad_token_id, packing=False))])
    assert torch.allclose(packed, separate, atol=1e-4)


def test_answer_cut_by_prepare_does_not_teach_stopping(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    whole, cut = tokenize_records([{"messages": CONVERSATION}, {"messages": CONVERSATION, "meta": {"truncated": True}}],
                                  tokenizer, "assistant", 512)
    assert trained_text(tokenizer, whole).endswith("You are welcome.<end_of_turn>")
    assert trained_text(tokenizer, cut).endswith("You are welcome.")
