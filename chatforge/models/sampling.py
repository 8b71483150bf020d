"""Choosing the next token of many rows at once, each with its own settings and seeded generator.

Use it like this::

    rows = [SamplingSettings(), SamplingSettings(temperature=0.7, top_p=0.9, seed=1, frequency_penalty=0.5)]
    sampler = RowSampler(vocab_size=logits.shape[-1])
    token_ids = sampler.choose(logits, rows, generators, penalties)   # logits [rows, vocab] -> list[int]

Greedy rows take the argmax, the others one draw from their (temperature, top-p) distribution: the arithmetic is
batched over rows, and only the uniform number of each draw comes from the row's own `torch.Generator` (inverse
CDF), so a seeded row samples the same tokens whatever it is batched with (up to float rounding).

Numbers that would break a draw never fail a row: a temperature under `MIN_TEMPERATURE` (1e-300 included) is
greedy, NaN logits count as impossible, and a row whose distribution is still not finite falls back to its argmax.

Penalties (`PenaltyState`, only built when a row asks for one): OpenAI's `frequency_penalty` (subtracted once per
earlier occurrence in the answer) and `presence_penalty` (once if it occurred), both in [-2, 2], and
transformers' `repetition_penalty` (> 0; logits of tokens seen in the prompt or answer are divided by it when
positive, multiplied when negative), as vLLM applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-5  # below this, sampling is argmax to float precision, and dividing by it overflows


@dataclass
class SamplingSettings:
    """How one answer is decoded. temperature 0 is greedy; stop strings end the answer (and are cut from it)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return not self.temperature >= MIN_TEMPERATURE  # NaN is greedy too

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with a random seed when None."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return generator


class PenaltyState:
    """Per-row token counts for the penalties: answer counts and a seen-in-prompt-or-answer mask, [rows, vocab]."""

    def __init__(self, vocab_size: int, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                 settings: Sequence[SamplingSettings], device: torch.device) -> None:
        rows = len(prompts)
        self.answer_counts = torch.zeros((rows, vocab_size), dtype=torch.float32, device=device)
        self.seen = torch.zeros((rows, vocab_size), dtype=torch.bool, device=device)
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            ids = torch.tensor([t for t in list(prompt) + list(answer) if 0 <= t < vocab_size], dtype=torch.long)
            self.seen[row, ids.to(device)] = True
            answer_ids = torch.tensor([t for t in answer if 0 <= t < vocab_size], dtype=torch.long, device=device)
            self.answer_counts[row].index_add_(0, answer_ids, torch.ones(len(answer_ids), device=device))
        self.frequency = torch.tensor([s.frequency_penalty for s in settings], device=device)[:, None]
        self.presence = torch.tensor([s.presence_penalty for s in settings], device=device)[:, None]
        self.repetition = torch.tensor([s.repetition_penalty for s in settings], device=device)[:, None]

    def add(self, token_ids: Sequence[int]) -> None:
        """Count one new token per row (in row order); ids outside the vocabulary are ignored."""
        vocab = self.seen.shape[1]
        for row, token_id in enumerate(token_ids):
            if 0 <= token_id < vocab:
                self.answer_counts[row, token_id] += 1
                self.seen[row, token_id] = True

    def select(self, index: Tensor) -> None:
        """Keep the rows `index` names, in its order (rows that left the batch)."""
        self.answer_counts, self.seen = self.answer_counts[index], self.seen[index]
        self.frequency, self.presence, self.repetition = self.frequency[index], self.presence[index], self.repetition[index]

    def apply(self, logits: Tensor) -> Tensor:
        """The penalised logits (a new tensor)."""
        repeated = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
        logits = torch.where(self.seen, repeated, logits)
        return logits - self.frequency * self.answer_counts - self.presence * (self.answer_counts > 0)


def choose_tokens(logits: Tensor, settings: Sequence[SamplingSettings], generators: Sequence[torch.Generator],
                  penalties: PenaltyState | None = None) -> list[int]:
    """The next token of every row of `logits` [rows, vocab]; see the module docstring."""
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"))
    if penalties is not None:
        logits = penalties.apply(logits)
    chosen = logits.argmax(-1)
    sampled_rows = [row for row, s in enumerate(settings) if not s.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        temperatures = torch.tensor([settings[r].temperature for r in sampled_rows], device=logits.device)[:, None]
        probs = torch.softmax(logits[index] / temperatures, dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=generators[r]) for r in sampled_rows]).to(logits.device)
        top_ps = torch.tensor([min(settings[r].top_p, 1.0) for r in sampled_rows], device=logits.device)
        drawn = _draw(probs, uniforms, top_ps)
        usable = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
        chosen[index] = torch.where(usable, drawn, chosen[index])
    return chosen.tolist()


def _draw(probs: Tensor, uniforms: Tensor, top_ps: Tensor) -> Tensor:
    """One inverse-CDF draw per row from `probs`, restricted to each row's top-p nucleus where top_p < 1."""
    drawn = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    nucleus = top_ps < 1.0
    if (~nucleus).any():
        drawn[~nucleus] = _inverse_cdf(probs[~nucleus], uniforms[~nucleus])
    if nucleus.any():
        sorted_probs, order = probs[nucleus].sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_ps[nucleus, None]
        keep[:, 0] = True  # the most likely token always stays (a top_p below float32's range would keep none)
        picked = _inverse_cdf(sorted_probs * keep, uniforms[nucleus])
        drawn[nucleus] = order.gather(1, picked[:, None])[:, 0]
    return drawn


def _inverse_cdf(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Index i of each row where the running sum of `weights` first passes uniform * total (never a zero weight)."""
    cumulative = weights.cumsum(-1)
    targets = uniforms[:, None] * cumulative[:, -1:]
    picked = torch.searchsorted(cumulative, targets, right=True)[:, 0]
    return picked.clamp(max=weights.shape[-1] - 1)
