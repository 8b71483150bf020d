"""Packed or padded batch plans for training, over the tokenised examples of core/examples.py.

Use it like this::

    examples = tokenize_records(records, tokenizer, train_on="assistant", max_length=1024)   # core/examples.py
    plan = plan_batches(examples, batch_size=4, max_length=1024, packing=True, seed=0, epoch=0)
    batch = collate(plan[0], examples, pad_id=tokenizer.pad_token_id, packing=True)   # tensors for one step
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from chatforge.core.examples import Example


def pack_examples(examples: Sequence[Example], max_length: int) -> list[list[int]]:
    """Group example indices into bins of at most max_length tokens (first-fit decreasing, deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index].input_ids)
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(max_length - size)
    return bins


def plan_batches(
    examples: Sequence[Example], batch_size: int, max_length: int, packing: bool, seed: int, epoch: int,
    packed_rows: list[list[int]] | None = None,
) -> list[list[list[int]]]:
    """The batches of one epoch, deterministic in (seed, epoch): each batch is a list of rows, a row a list of
    example indices (one index per row without packing). Without packing, rows of similar length share a batch
    to waste little padding. The packing itself does not depend on the epoch: pass `packed_rows`
    (`pack_examples`' result) to plan many epochs without packing again."""
    rng = random.Random(seed * 100_003 + epoch)
    if packing:
        rows = list(packed_rows) if packed_rows is not None else pack_examples(examples, max_length)
        rng.shuffle(rows)
    else:
        indices = list(range(len(examples)))
        rng.shuffle(indices)
        window = batch_size * 32  # sort by length inside windows: little padding, still shuffled
        rows = []
        for start in range(0, len(indices), window):
            chunk = sorted(indices[start : start + window], key=lambda i: len(examples[i].input_ids))
            rows.extend([i] for i in chunk)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if not packing:
        rng.shuffle(batches)
    return batches
