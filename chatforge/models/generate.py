"""Batched text generation with a KV cache and continuous batching, for every kind of loaded run: what eval,
rating and serve decode with.

Use it like this::

    loaded = load_run("runs/r1")
    prompts = [chat_prompt_ids(loaded.tokenizer, messages) for messages in conversations]
    answers = generate_batch(loaded, prompts, SamplingSettings(max_new_tokens=64))     # greedy
    answers[0].text, answers[0].finish_reason          # "stop" (end-of-turn, eos or a stop string) or "length"

    batch = DecodeBatch(loaded)                        # step by step, e.g. to stream tokens as they come
    rows = batch.add(prompts, [SamplingSettings(temperature=0.7, seed=1)] * len(prompts))
    while not batch.done:
        for row, token_id, piece in batch.step():      # piece: the new settled text of that row
            ...
        more = batch.add([late_prompt], [SamplingSettings()])   # joins the running batch before the next step
    batch.result(rows[0])                              # Generation; batch.release(row) forgets a finished row

Continuous batching: `add` prefills the new prompts (together, left-padded) and merges their KV cache into the
running batch's (`kv_rows.merge_rows`); their first token is chosen at the next `step` with everyone else's. Each
step feeds only the new token of every running row; rows that finish leave the cache at once, and padding that
no remaining row needs is trimmed. Rows keep their own positions, sampling settings and seeded generator
(`sampling.choose_tokens`), so a seeded request gives the same answer whatever it is batched with (up to float
rounding of batched matmuls). Text is detokenised incrementally (`detokenize.TextDecoder`) and stop strings are
searched in the new text only, so no step's work grows with the length of an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chatforge.models.detokenize import TextDecoder
from chatforge.models.kv_rows import merge_rows, select_rows, trim_left
from chatforge.models.run import LoadedRun, forward_step
from chatforge.models.sampling import PenaltyState, SamplingSettings, choose_tokens, new_generator
from chatforge.models.tokens import pad_token_id

__all__ = ["DecodeBatch", "Generation", "SamplingSettings", "chat_prompt_ids", "context_length", "generate_batch"]


@dataclass
class Generation:
    """One decoded answer: its tokens (without the stop token), text, prompt length and why it ended."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"


@dataclass
class _Row:
    prompt: list[int]
    settings: SamplingSettings
    generator: torch.Generator
    decoder: TextDecoder
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cut_text: str | None = None  # the text up to the stop string that ended it
    stop_scanned: int = 0  # characters of decoder.text already searched for stop strings


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, ending with the assistant's generation prompt."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def context_length(loaded: LoadedRun) -> int | None:
    """The model's maximum sequence length (config.max_position_embeddings), or None when it does not say."""
    config = getattr(loaded.model, "config", None)
    return getattr(config, "max_position_embeddings", None)


class DecodeBatch:
    """A running batch that rows join (`add`) and leave; see the module docstring. Not thread-safe: one caller."""

    def __init__(self, loaded: LoadedRun, prompts: Sequence[Sequence[int]] = (),
                 settings: Sequence[SamplingSettings] = ()) -> None:
        self.loaded = loaded
        self.stop_ids = set(loaded.stop_token_ids)
        self.device = next(loaded.model.parameters()).device
        self.rows: dict[int, _Row] = {}
        self.active: list[int] = []  # rows still decoding, in cache order
        self.cache: Any = None
        self.attention_mask: Tensor | None = None
        self._next_logits: Tensor | None = None
        self._penalties: PenaltyState | None = None
        self._next_row = 0
        if prompts or settings:
            self.add(prompts, settings)

    @property
    def done(self) -> bool:
        return not self.active

    def add(self, prompts: Sequence[Sequence[int]], settings: Sequence[SamplingSettings]) -> list[int]:
        """Prefill `prompts` and merge them into the running batch; return their row ids (decoded from next step).

        Raises ValueError for an empty prompt or a settings count that does not match (nothing is added then)."""
        if len(prompts) != len(settings) or not prompts:
            raise ValueError(f"{len(prompts)} prompts and {len(settings)} settings; need one setting per prompt (>= 1)")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be decoded; give it at least a start token")
        logits, cache, mask = self._prefill(prompts)
        row_ids = list(range(self._next_row, self._next_row + len(prompts)))
        self._next_row += len(prompts)
        for row, prompt, setting in zip(row_ids, prompts, settings):
            self.rows[row] = _Row(list(prompt), setting, new_generator(setting.seed), TextDecoder(self.loaded.tokenizer))
        if self.done:
            self.cache, self.attention_mask, self._next_logits = cache, mask, logits
        else:
            assert self.attention_mask is not None and self._next_logits is not None
            width = max(self.attention_mask.shape[1], mask.shape[1])
            self.cache = merge_rows(self.cache, cache)
            self.attention_mask = torch.cat([_left_pad_mask(self.attention_mask, width), _left_pad_mask(mask, width)])
            self._next_logits = torch.cat([self._next_logits, logits])
        self.active += row_ids
        self._penalties = None  # rebuilt for the new rows at the next step if any row needs them
        return row_ids

    def step(self) -> list[tuple[int, int, str]]:
        """Choose the next token of every running row; return (row, token id, new text) triples, stop tokens
        included (with text "")."""
        if self.done:
            return []
        assert self._next_logits is not None
        rows = [self.rows[r] for r in self.active]
        if self._penalties is None and any(row.settings.penalised for row in rows):
            self._penalties = PenaltyState(self._next_logits.shape[-1], [r.prompt for r in rows],
                                           [r.generated for r in rows], [r.settings for r in rows], self.device)
        chosen = self._choose(rows)
        emitted: list[tuple[int, int, str]] = []
        for row_id, row, token_id in zip(self.active, rows, chosen):
            if row.finish_reason is not None:  # its sampling failed
                emitted.append((row_id, token_id, ""))
                continue
            if token_id in self.stop_ids:
                row.finish_reason = "stop"
                emitted.append((row_id, token_id, row.decoder.flush()))
                continue
            row.generated.append(token_id)
            piece = row.decoder.push(token_id)
            if len(row.generated) >= row.settings.max_new_tokens:
                row.finish_reason = "length"
                piece += row.decoder.flush()
            if self._hit_stop_string(row):
                row.finish_reason = "stop"
            emitted.append((row_id, token_id, piece))
        if self._penalties is not None:
            self._penalties.add(chosen)
        self._advance(chosen)
        return emitted

    def cancel(self, row: int, reason: str = "cancelled") -> None:
        """Stop decoding `row` (its client went away); its result keeps what was generated, with `reason`."""
        if row in self.active and self.rows[row].finish_reason is None:
            self.rows[row].finish_reason = reason
            self._advance(None)

    def fail_all(self) -> list[int]:
        """End every running row with reason "error" (the batch's forward pass failed); return their ids."""
        failed = list(self.active)
        for row in failed:
            self.rows[row].finish_reason = "error"
        self.active, self.cache, self.attention_mask, self._next_logits, self._penalties = [], None, None, None, None
        return failed

    def result(self, row: int) -> Generation:
        """The answer of `row` so far (final once it has a finish reason)."""
        state = self.rows[row]
        text = state.cut_text if state.cut_text is not None else state.decoder.text
        return Generation(list(state.generated), text, len(state.prompt), state.finish_reason or "length")

    def text_so_far(self, row: int) -> str:
        """The settled text of `row` (before any stop-string cut)."""
        return self.rows[row].decoder.text

    def finish_reason(self, row: int) -> str | None:
        return self.rows[row].finish_reason

    def release(self, row: int) -> Generation:
        """The final answer of a finished `row`, forgetting it (a long-running batch does not keep every answer)."""
        generation = self.result(row)
        if row not in self.active:
            del self.rows[row]
        return generation

    def results(self) -> list[Generation]:
        """One Generation per row still known, in row order (rows still running are reported as they stand)."""
        return [self.result(row) for row in sorted(self.rows)]

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Any, Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_token_id(self.loaded.tokenizer), dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        attention_mask = attention_mask.to(self.device)
        with torch.inference_mode():
            logits, cache = forward_step(self.loaded.model, input_ids.to(self.device), None, attention_mask,
                                         position_ids.to(self.device), logits_to_keep=1)
        return logits[:, -1].float(), cache, attention_mask

    def _choose(self, rows: list[_Row]) -> list[int]:
        """Every row's next token; if the batched draw fails, row by row, and a row that fails alone ends "error"."""
        assert self._next_logits is not None
        settings = [row.settings for row in rows]
        generators = [row.generator for row in rows]
        try:
            return choose_tokens(self._next_logits, settings, generators, self._penalties)
        except Exception:  # noqa: BLE001 - a row's settings broke the batched draw: find it, the others go on
            chosen = []  # (without penalties: a last resort that keeps rows alive)
            for slot, row in enumerate(rows):
                try:
                    chosen += choose_tokens(self._next_logits[slot:slot + 1], [row.settings], [row.generator])
                except Exception:  # noqa: BLE001 - this row alone fails; the engine logs and answers 500
                    row.finish_reason = "error"
                    chosen.append(-1)
            return chosen

    def _hit_stop_string(self, row: _Row) -> bool:
        stops = [s for s in row.settings.stop if s]
        if not stops:
            return False
        text = row.decoder.text
        start = max(0, row.stop_scanned - max(len(s) for s in stops) + 1)  # a stop may straddle the old end
        row.stop_scanned = len(text)
        cuts = [found for s in stops if (found := text.find(s, start)) >= 0]
        if not cuts:
            return False
        row.cut_text = text[: min(cuts)]
        return True

    def _advance(self, chosen: list[int] | None) -> None:
        """Drop finished rows from the cache and feed the chosen tokens of the rows that go on."""
        keep_slots = [slot for slot, row in enumerate(self.active) if self.rows[row].finish_reason is None]
        if len(keep_slots) < len(self.active):
            self._select(keep_slots)
        if chosen is None or self.done:
            return
        assert self.attention_mask is not None
        tokens = torch.tensor([[chosen[slot]] for slot in keep_slots], device=self.device)
        ones = torch.ones((len(self.active), 1), dtype=self.attention_mask.dtype, device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        positions = torch.tensor([[len(self.rows[r].prompt) + len(self.rows[r].generated) - 1] for r in self.active],
                                 device=self.device)
        with torch.inference_mode():
            logits, self.cache = forward_step(self.loaded.model, tokens, self.cache, self.attention_mask, positions)
        self._next_logits = logits[:, -1].float()

    def _select(self, keep_slots: list[int]) -> None:
        self.active = [self.active[slot] for slot in keep_slots]
        if not keep_slots:
            self.cache, self.attention_mask, self._next_logits, self._penalties = None, None, None, None
            return
        assert self.attention_mask is not None and self._next_logits is not None
        index = torch.tensor(keep_slots, dtype=torch.long, device=self.device)
        self.attention_mask = self.attention_mask[index]
        self._next_logits = self._next_logits[index]
        self.cache = select_rows(self.cache, index)
        if self._penalties is not None:
            self._penalties.select(index)
        unused = int((self.attention_mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding positions
        if unused:
            self.attention_mask = self.attention_mask[:, unused:]
            self.cache = trim_left(self.cache, unused)


def _left_pad_mask(mask: Tensor, width: int) -> Tensor:
    missing = width - mask.shape[1]
    return mask if missing <= 0 else torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)




def generate_batch(
    loaded: LoadedRun,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings | Sequence[SamplingSettings] | None = None,
    batch_size: int = 16,
) -> list[Generation]:
    """Decode every prompt to the end, up to `batch_size` at a time (shortest prompts first; a finished row's place
    goes to the next prompt at once); results in prompt order.
    `settings`: one for all prompts or one per prompt; None = greedy with the defaults."""
    settings = settings or SamplingSettings()
    per_prompt = [settings] * len(prompts) if isinstance(settings, SamplingSettings) else list(settings)
    pending = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[::-1]  # pop() takes the shortest
    batch = DecodeBatch(loaded)
    prompt_of_row: dict[int, int] = {}
    results: list[Generation | None] = [None] * len(prompts)
    while pending or not batch.done:
        free = batch_size - len(batch.active)
        if pending and free > 0:
            joining = [pending.pop() for _ in range(min(free, len(pending)))]
            rows = batch.add([prompts[i] for i in joining], [per_prompt[i] for i in joining])
            prompt_of_row.update(zip(rows, joining))
        for row, _token_id, _piece in batch.step():
            if batch.finish_reason(row) is not None:
                results[prompt_of_row[row]] = batch.release(row)
    return [r for r in results if r is not None]
