"""int8 serving weights: every Linear (LM head included) becomes int8, the perplexity stays within 1 % of fp32,
greedy decoding still works through the engine's decode path, and the serve config switches it on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatforge.config import ServeConfig
from chatforge.models.generate import SamplingSettings, chat_prompt_ids, generate_batch
from chatforge.models.quantize import perplexity, quantize_int8
from chatforge.models.run import load_run
from chatforge.models.tiny import tiny_chat_text


def test_int8_keeps_perplexity_within_one_percent_of_fp32(tiny_model_dir: Path) -> None:
    fp32 = load_run(tiny_model_dir)
    int8 = quantize_int8(fp32)
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    assert isinstance(int8.model.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(fp32.model.lm_head, torch.nn.Linear)  # the original is untouched
    texts = [line for line in tiny_chat_text().splitlines() if len(line) > 20][:20]
    assert perplexity(int8, texts) == pytest.approx(perplexity(fp32, texts), rel=0.01)
    prompt = chat_prompt_ids(int8.tokenizer, [{"role": "user", "content": "hi"}])
    assert len(generate_batch(int8, [prompt], SamplingSettings(max_new_tokens=3))[0].token_ids) <= 3


def test_serve_config_takes_the_quantize_flag() -> None:
    assert ServeConfig().quantize == "none" and ServeConfig(quantize="int8").quantize == "int8"
    with pytest.raises(ValueError, match="quantize"):
        ServeConfig(quantize="int4")
