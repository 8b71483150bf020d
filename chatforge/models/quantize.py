"""int8 weights for CPU inference: every `nn.Linear` (the LM head included) as torch's dynamic int8 quantisation.

Use it like this::

    loaded = load_run("runs/r1")
    fast = quantize_int8(loaded)                        # a new LoadedRun; `serve.quantize: int8` does this
    perplexity(fast, texts), perplexity(loaded, texts)  # the check before trusting it: within ~1 %?

Weights are stored as int8 with a scale per output channel, activations are quantised per batch on the fly: a
quarter of the memory traffic of fp32 for the matmuls that dominate a CPU decode step (see benchmarks/RESULTS.md).
Embeddings stay fp32 (a tied LM head gets its own int8 copy). CPU only: torch's quantised kernels (fbgemm) have
no CUDA implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from chatforge.models.run import LoadedRun, forward_step


def quantize_int8(loaded: LoadedRun) -> LoadedRun:
    """`loaded` with int8 dynamic quantisation of its Linear layers (the original is left as it was)."""
    device = next(loaded.model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"serve.quantize int8 runs on the CPU only; this model is on {device}")
    per_channel = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    quantized = torch.ao.quantization.quantize_dynamic(loaded.model, per_channel, dtype=torch.qint8, inplace=False)
    return replace(loaded, model=quantized.eval())


def perplexity(loaded: LoadedRun, texts: Sequence[str]) -> float:
    """exp(mean next-token negative log-likelihood) of `texts` (each tokenised with its special tokens)."""
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=True)["input_ids"]])
        if ids.shape[1] < 2:
            continue
        with torch.inference_mode():
            logits, _ = forward_step(loaded.model, ids, use_cache=False)
        log_probs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        total_nll -= float(log_probs.gather(1, ids[0, 1:, None]).sum())
        total_tokens += ids.shape[1] - 1
    if not total_tokens:
        raise ValueError("no text of two tokens or more to measure perplexity on")
    return math.exp(total_nll / total_tokens)
