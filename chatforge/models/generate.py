"""Batched text generation with a KV cache, for every kind of loaded run: what eval, rating and serve decode with.

Use it like this::

    loaded = load_run("runs/r1")
    prompts = [chat_prompt_ids(loaded.tokenizer, messages) for messages in conversations]
    answers = generate_batch(loaded, prompts, SamplingSettings(max_new_tokens=64))     # greedy
    answers[0].text, answers[0].finish_reason          # "stop" (end-of-turn, eos or a stop string) or "length"

    batch = DecodeBatch(loaded, prompts, [SamplingSettings(temperature=0.7, seed=1)] * len(prompts))
    while not batch.done:                              # step by step, e.g. to stream tokens as they come
        for row, token_id in batch.step():
            ...
    batch.results()

Rows are left-padded into one batch; each decode step feeds only the new token of every row still running, and
rows that finish are dropped from the cache (`batch_select_indices`) so a long answer does not make the short ones
pay. Each row has its own sampling settings and random generator, so a seeded request gives the same answer
whatever it is batched with (up to float rounding of batched matmuls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chatforge.models.run import LoadedRun, forward_step
from chatforge.models.tokens import pad_token_id


@dataclass
class SamplingSettings:
    """How one answer is decoded. temperature 0 is greedy; stop strings end the answer (and are cut from it)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Generation:
    """One decoded answer: its tokens (without the stop token), text, prompt length and why it ended."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, ending with the assistant's generation prompt."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def context_length(loaded: LoadedRun) -> int | None:
    """The model's maximum sequence length (config.max_position_embeddings), or None when it does not say."""
    config = getattr(loaded.model, "config", None)
    return getattr(config, "max_position_embeddings", None)


class DecodeBatch:
    """Several prompts decoded together; see the module docstring. Not thread-safe: one caller steps it."""

    def __init__(self, loaded: LoadedRun, prompts: Sequence[Sequence[int]], settings: Sequence[SamplingSettings]) -> None:
        if len(prompts) != len(settings) or not prompts:
            raise ValueError(f"{len(prompts)} prompts and {len(settings)} settings; need one setting per prompt (>= 1)")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be decoded; give it at least a start token")
        self.loaded = loaded
        self.settings = list(settings)
        self.prompt_lengths = [len(p) for p in prompts]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self.stop_ids = set(loaded.stop_token_ids)
        self.generators = [_generator(s.seed) for s in self.settings]
        self.device = next(loaded.model.parameters()).device
        self.active: list[int] = list(range(len(prompts)))  # rows still decoding, in cache order
        self.cache: Any = None
        self._texts: list[str | None] = [None] * len(prompts)  # set when a stop string cut the text
        self._prefill(prompts)

    @property
    def done(self) -> bool:
        return not self.active

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        width = max(self.prompt_lengths)
        pad_id = pad_token_id(self.loaded.tokenizer)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.attention_mask = attention_mask.to(self.device)
        with torch.inference_mode():
            logits, self.cache = forward_step(self.loaded.model, input_ids.to(self.device), None, self.attention_mask,
                                              position_ids.to(self.device), logits_to_keep=1)
        self._next_logits = logits[:, -1].float()

    def step(self) -> list[tuple[int, int]]:
        """Choose the next token of every running row; return (row, token id) pairs, stop tokens included."""
        if self.done:
            return []
        chosen = [self._choose(row, self._next_logits[slot]) for slot, row in enumerate(self.active)]
        emitted: list[tuple[int, int]] = []
        for row, token_id in zip(self.active, chosen):
            emitted.append((row, token_id))
            if token_id in self.stop_ids:
                self.finish_reasons[row] = "stop"
                continue
            self.generated[row].append(token_id)
            if self._hit_stop_string(row):
                self.finish_reasons[row] = "stop"
            elif len(self.generated[row]) >= self.settings[row].max_new_tokens:
                self.finish_reasons[row] = "length"
        self._advance(chosen)
        return emitted

    def cancel(self, row: int) -> None:
        """Stop decoding `row` (its client went away); its result keeps what was generated, reason "cancelled"."""
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = "cancelled"
            self._advance(None)

    def results(self) -> list[Generation]:
        """One Generation per prompt, in prompt order (rows still running are reported as they stand)."""
        out = []
        for row, tokens in enumerate(self.generated):
            text = self._texts[row]
            if text is None:
                text = self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append(Generation(list(tokens), text, self.prompt_lengths[row], self.finish_reasons[row] or "length"))
        return out

    def _choose(self, row: int, logits: Tensor) -> int:
        settings = self.settings[row]
        if settings.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < settings.top_p
            keep[0] = True  # the most likely token always stays (a top_p below float32's range would keep none)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generators[row]))

    def _hit_stop_string(self, row: int) -> bool:
        stops = self.settings[row].stop
        if not stops:
            return False
        text = self.loaded.tokenizer.decode(self.generated[row], skip_special_tokens=True)
        cuts = [text.find(s) for s in stops if s and s in text]
        if not cuts:
            return False
        self._texts[row] = text[: min(cuts)]
        return True

    def _advance(self, chosen: list[int] | None) -> None:
        """Drop finished rows from the cache and feed the chosen tokens of the rows that go on."""
        keep_slots = [slot for slot, row in enumerate(self.active) if self.finish_reasons[row] is None]
        if chosen is None:  # a cancel between steps: nothing new to feed, only rows to drop
            if len(keep_slots) < len(self.active):
                self._select(keep_slots)
            return
        tokens = [chosen[slot] for slot in keep_slots]
        if len(keep_slots) < len(self.active):
            self._select(keep_slots)
        if self.done:
            return
        ones = torch.ones((len(self.active), 1), dtype=self.attention_mask.dtype, device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        positions = torch.tensor([[self.prompt_lengths[r] + len(self.generated[r]) - 1] for r in self.active],
                                 device=self.device)
        with torch.inference_mode():
            logits, self.cache = forward_step(self.loaded.model, torch.tensor([tokens], device=self.device).T,
                                              self.cache, self.attention_mask, positions)
        self._next_logits = logits[:, -1].float()

    def _select(self, keep_slots: list[int]) -> None:
        index = torch.tensor(keep_slots, dtype=torch.long, device=self.device)
        self.active = [self.active[slot] for slot in keep_slots]
        if not keep_slots:
            self.cache = None
            return
        self.attention_mask = self.attention_mask[index]
        self._next_logits = self._next_logits[index]
        self.cache = _select_cache_rows(self.cache, index)


def _select_cache_rows(cache: Any, index: Tensor) -> Any:
    if isinstance(cache, tuple):  # an ensemble: one cache per member
        return tuple(_select_cache_rows(member, index) for member in cache)
    cache.batch_select_indices(index)
    return cache


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return generator


def generate_batch(
    loaded: LoadedRun,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings | Sequence[SamplingSettings] | None = None,
    batch_size: int = 16,
) -> list[Generation]:
    """Decode every prompt to the end, `batch_size` at a time (prompts of similar length together); prompt order.
    `settings`: one for all prompts or one per prompt; None = greedy with the defaults."""
    settings = settings or SamplingSettings()
    per_prompt = [settings] * len(prompts) if isinstance(settings, SamplingSettings) else list(settings)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = DecodeBatch(loaded, [prompts[i] for i in chunk], [per_prompt[i] for i in chunk])
        while not batch.done:
            batch.step()
        for index, generation in zip(chunk, batch.results()):
            results[index] = generation
    return [r for r in results if r is not None]
