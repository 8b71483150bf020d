"""Conversations -> token ids with a loss mask -> padded batch tensors: what training and evaluation share.

Use it like this::

    examples = tokenize_records(records, tokenizer, train_on="assistant", max_length=1024)   # masks: models/masks.py
    batch = collate([[0], [1]], examples, pad_id=tokenizer.pad_token_id, packing=False)      # one row per example
    print(mask_summary(examples))

Labels follow the Hugging Face convention: `labels[i]` is the token at i when it carries loss, else -100, and the
model at position i-1 predicts it. The first token of every example never carries loss, so in a packed sequence no
example is trained to predict the start of the next one. Packed rows (several examples in one row; see
train/batches.py for the packing plan) restart `position_ids` at 0 for each conversation and have no attention mask:
transformers then builds a block-diagonal causal mask from the position ids, so no token attends across
conversations. Training, eval's perplexity, the bias probe and `chatforge inspect` all mask through here, so a change
to the mask changes all of them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from chatforge.models.masks import answer_token_mask

IGNORE = -100
TrainOn = Literal["assistant", "last_assistant", "all"]


@dataclass
class Example:
    """One tokenised conversation: ids, labels (-100 where no loss) and whether it was cut at max_length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    mask_method: str = "all"  # how the answers were found: "markers", "spans", "last_turn" (see models/masks.py)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def _last_span_only(mask: list[int]) -> list[int]:
    """Keep only the last run of ones in a 0/1 mask (the final assistant turn)."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [1 if start <= i < end else 0 for i in range(len(mask))]


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], train_on: TrainOn, max_length: int) -> Example:
    """Render `messages` with the tokenizer's chat template and mark which tokens carry loss: every answer and its
    end-of-turn marker (`answer_token_mask`, for any template), the last one only, or all tokens."""
    if train_on == "all":
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        input_ids = list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        mask, method = [1] * len(input_ids), "all"
    else:
        masked = answer_token_mask(tokenizer, messages)
        input_ids, mask, method = masked.input_ids, masked.mask, masked.method
        if train_on == "last_assistant":
            mask = _last_span_only(mask)
    mask[0] = 0
    truncated = len(input_ids) > max_length
    input_ids, mask = input_ids[:max_length], mask[:max_length]
    return Example(input_ids, [tok if keep else IGNORE for tok, keep in zip(input_ids, mask)], truncated, method)


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer: Any, train_on: TrainOn, max_length: int) -> list[Example]:
    """Tokenise every record; examples with no trained token (e.g. cut before the answer) are left out.

    A record whose last answer `prepare` cut to fit (`meta.truncated`) keeps its answer tokens but not the
    end-of-turn token after them: the model must not learn to stop mid-sentence."""
    examples = []
    for record in records:
        example = tokenize_conversation(tokenizer, record["messages"], train_on, max_length)
        if record.get("meta", {}).get("truncated") and not example.truncated:
            last = max((i for i, label in enumerate(example.labels) if label != IGNORE), default=None)
            if last is not None:
                example.labels[last] = IGNORE
        examples.append(example)
    return [e for e in examples if e.trained_tokens > 0]


def mask_summary(examples: Sequence[Example]) -> str:
    """One line saying how the loss masks were made, e.g. 'answers found by rendering prefix by prefix (the chat
    template has no {% generation %} markers)'."""
    methods = {e.mask_method for e in examples}
    parts = []
    if "markers" in methods:
        parts.append("answers marked by the chat template's {% generation %} blocks")
    if "spans" in methods:
        parts.append("answers found by rendering each conversation prefix by prefix (no {% generation %} markers)")
    if "last_turn" in methods:
        count = sum(e.mask_method == "last_turn" for e in examples)
        parts.append(f"{count} conversations trained on their last answer only (the template rewrites earlier turns)")
    if "all" in methods:
        parts.append("every token trained (train_on all)")
    return "loss mask: " + "; ".join(parts) if parts else "loss mask: no examples"


def collate(batch: list[list[int]], examples: Sequence[Example], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Tensors for one batch: input_ids, labels and either attention_mask (padded) or position_ids (packed)."""
    rows_ids, rows_labels, rows_positions = [], [], []
    for row in batch:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in row:
            example = examples[index]
            ids += example.input_ids
            labels += example.labels
            positions += range(len(example.input_ids))
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_positions.append(positions)
    width = max(len(ids) for ids in rows_ids)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, row_labels, positions) in enumerate(zip(rows_ids, rows_labels, rows_positions)):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids)] = torch.tensor(row_labels)
        attention_mask[r, : len(ids)] = 1
        position_ids[r, : len(ids)] = torch.tensor(positions)
        position_ids[r, len(ids) :] = torch.arange(width - len(ids))  # padding is its own tiny "sequence"
    if packing:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
