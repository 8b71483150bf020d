"""Before training: an estimate of peak memory and time, from the model's size and a matmul measured here.

Use it like this (as `train` does)::

    estimate = estimate_run(model, examples, micro_batches, step_tokens, cfg, world=1)
    print(estimate["summary"])          # "~3.1 GB peak, ~14 min for 200 steps (...)"

Rules of thumb, stated so they can be checked against a real run: a forward pass costs 2 FLOPs per parameter per
token position; LoRA's backward costs one more such pass (gradients w.r.t. activations only), full fine-tuning two.
The LM head is charged only on trained positions (chatforge computes it nowhere else). Achieved speed is taken as
half the fp32 (or bf16 on GPU) matmul speed measured in this process.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from chatforge.config import TrainConfig
from chatforge.core.examples import Example
from chatforge.core.loss import causal_lm_of, loss_chunk_rows
from chatforge.device import resolve_device, training_dtype
from chatforge.train.model import count_parameters

EFFICIENCY = 0.5  # fraction of the measured matmul speed a training step reaches (checked on Gemma 270M here)


def measure_matmul_flops(size: int = 1024, repeats: int = 4, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul here (the peak used for estimates and for model-FLOPs utilisation)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - t0)


def estimate_run(
    model: Any, examples: list[Example], micro_batches: list[list[list[int]]], step_tokens: list[int],
    cfg: TrainConfig, world: int,
) -> dict[str, Any]:
    """Estimated peak memory (bytes) and time (s) for the planned steps, plus a one-line summary."""
    total_params, trainable = count_parameters(model)
    head = causal_lm_of(model).get_output_embeddings().weight
    head_params = head.numel()
    body_params = total_params - head_params
    positions = sum(len(examples[i].input_ids) for batch in micro_batches for row in batch for i in row) * world
    trained = sum(step_tokens)
    backward_passes = 2 if cfg.method == "full" else 1
    flops = 2 * (1 + backward_passes) * (body_params * positions + head_params * trained)
    device = resolve_device(cfg.device)
    peak = measure_matmul_flops(device=str(device), dtype=training_dtype(device))
    seconds = flops / (peak * EFFICIENCY * world)
    widest = max((sum(len(examples[i].input_ids) for i in row) for batch in micro_batches[:200] for row in batch), default=0)
    config = causal_lm_of(model).config
    hidden = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    batch_positions = cfg.batch_size * widest
    activations = batch_positions * hidden * layers * 4 * 24  # ~24 saved fp32 values per hidden unit per layer
    optimizer_bytes = trainable * 4 * (3 if cfg.optimizer in {"adamw", "adam"} else 2)
    lm_head_chunk = loss_chunk_rows(head.shape[0], cfg.loss_chunk) * head.shape[0] * 4 * 3  # logits, softmax/gradient, soft-cap buffer
    memory = total_params * 4 + optimizer_bytes + activations + lm_head_chunk
    summary = (
        f"estimate: ~{memory / 2**30:.1f} GiB peak ({total_params / 1e6:.1f}M params, {trainable / 1e6:.2f}M trained), "
        f"~{seconds / 60:.1f} min for {len(step_tokens)} steps ({positions:,} positions, {trained:,} trained tokens; "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s)"
    )
    return {"peak_memory_bytes": int(memory), "seconds": seconds, "flops": flops, "matmul_peak_flops": peak,
            "positions": positions, "trained_tokens": trained, "params": total_params, "trainable_params": trainable,
            "summary": summary}
