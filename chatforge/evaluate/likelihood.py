"""Loss, perplexity and token accuracy of a loaded run on chat records, masked exactly as training masks them.

Use it like this::

    examples = tokenize_records(records, loaded.tokenizer, train_on="assistant", max_length=1024)
    scores = masked_likelihood(loaded, examples, batch_size=8)
    scores.loss, scores.perplexity, scores.token_accuracy, scores.tokens
    scores.per_example_loss[0]      # mean loss over the first example's trained tokens (nan when it has none)

Plain models go through the training loss (`CausalLMLoss`: decoder, then the LM head in chunks on trained
positions only, so a 262k vocabulary never materialises [batch, length, vocab] logits); an ensemble, whose
forward already returns log-probabilities, is scored one conversation at a time from its full output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chatforge.core.examples import IGNORE, Example, collate
from chatforge.core.loss import CausalLMLoss
from chatforge.models.run import LoadedRun, forward_step
from chatforge.models.tokens import pad_token_id


@dataclass
class Likelihood:
    loss: float  # mean cross-entropy per trained token (nats)
    perplexity: float
    token_accuracy: float
    tokens: int
    per_example_loss: list[float] = field(default_factory=list)


def masked_likelihood(loaded: LoadedRun, examples: Sequence[Example], batch_size: int = 8) -> Likelihood:
    """Score `examples` (from `tokenize_records`); see the module docstring."""
    pad_id = pad_token_id(loaded.tokenizer)
    scorer = _ensemble_scores if loaded.kind == "ensemble" else _plain_scores
    if loaded.kind == "ensemble":
        batch_size = 1  # full [length, vocab] log-probs per member: one conversation at a time
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # similar lengths pad less
    results: dict[int, tuple[float, int, int]] = {}
    device = next(loaded.model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            tensors = collate([[i] for i in chunk], examples, pad_id, packing=False)
            tensors = {name: t.to(device) for name, t in tensors.items()}
            for index, row_scores in zip(chunk, scorer(loaded.model, tensors)):
                results[index] = row_scores
    per_example = [results[i] for i in range(len(examples))]
    loss_sum = sum(s for s, _, _ in per_example)
    tokens = sum(n for _, n, _ in per_example)
    correct = sum(c for _, _, c in per_example)
    loss = loss_sum / tokens if tokens else float("nan")
    return Likelihood(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)) if tokens else float("nan"),
        token_accuracy=correct / tokens if tokens else float("nan"),
        tokens=tokens,
        per_example_loss=[s / n if n else float("nan") for s, n, _ in per_example],
    )


def _plain_scores(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[tuple[float, int, int]]:
    """(loss sum, trained tokens, argmax hits) per row, through training's own loss object."""
    return CausalLMLoss(model).per_row(tensors["input_ids"], tensors["labels"], tensors["attention_mask"])


def _ensemble_scores(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[tuple[float, int, int]]:
    """The ensemble's output is already log-probabilities of the mixture: gather the targets' entries."""
    log_probs, _ = forward_step(model, tensors["input_ids"], attention_mask=tensors["attention_mask"], use_cache=False)
    log_probs = torch.log_softmax(log_probs[:, :-1].float(), dim=-1)  # a no-op up to rounding; guards truncated vocabs
    targets = tensors["labels"][:, 1:]
    rows = []
    for row in range(targets.shape[0]):
        trained = targets[row] != IGNORE
        picked = log_probs[row][trained]
        wanted = targets[row][trained]
        loss_sum = -picked.gather(-1, wanted[:, None]).sum()
        correct = (picked.argmax(-1) == wanted).sum()
        rows.append((float(loss_sum), int(trained.sum()), int(correct)))
    return rows
