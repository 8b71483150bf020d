"""The model being trained: base weights, an optional LoRA adapter, and the masked-loss forward.

Use it like this::

    model = load_training_model("path/to/hf-dir", cfg, tokenizer)   # base_storage bf16: frozen base in 16 bits
    model = apply_lora(model, LoraSettings(r=16))            # or leave it for full fine-tuning
    loss_model = CausalLMLoss(model, chunk_size=512)         # core/loss.py: the same object eval scores with
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from chatforge.config import LoraSettings, TrainConfig
from chatforge.models.run import load_causal_lm
from chatforge.train.lowmem import STORAGE_DTYPES, low_precision_copy, store_frozen_base

# Attention projections by naming family; the first family whose names all exist in the model is used.
LORA_TARGET_FAMILIES = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Gemma, Mistral, Qwen, Phi-3 ...
    ("c_attn", "c_proj"),  # GPT-2
    ("query_key_value", "dense"),  # Falcon, GPT-NeoX
)


def load_base_model(location: Any, dtype: torch.dtype) -> Any:
    """AutoModelForCausalLM from an HF directory or hub id, in `dtype`, with the KV cache off (training)."""
    model = load_causal_lm(location, dtype)
    model.config.use_cache = False
    return model


def load_training_model(location: Any, cfg: TrainConfig, tokenizer: Any) -> Any:
    """The base model as `cfg` trains it, embeddings grown to `tokenizer`: for LoRA with `base_storage` bf16/fp16
    (the default) the frozen base is kept in 16 bits and computes in fp32 (train.lowmem), else everything is fp32;
    activations are recomputed in backward where `uses_gradient_checkpointing` says so."""
    storage = STORAGE_DTYPES.get(cfg.base_storage) if cfg.method == "lora" else None
    model = load_base_model(low_precision_copy(location, storage) if storage else location, storage or torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if storage:
        store_frozen_base(model, storage, keep_embeddings_fp32=cfg.lora.train_template_tokens)
    if uses_gradient_checkpointing(cfg) and (cfg.gradient_checkpointing or model.supports_gradient_checkpointing):
        model.activation_checkpointing_enable()  # non-reentrant: LoRA gets its gradients with a frozen embedding
    return model


def uses_gradient_checkpointing(cfg: TrainConfig) -> bool:
    """train.gradient_checkpointing as set, else on for LoRA (where the architecture supports it): only the layers'
    inputs stay alive between forward and backward (-0.9 to -1.3 GiB peak on Gemma 270M, packed 4 x 256) for one
    more forward through the body; a full fine-tune's weights, gradients and optimizer state dwarf its activations,
    so there it stays off unless asked for."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return cfg.method == "lora"


def default_lora_targets(model: nn.Module) -> list[str]:
    """The attention projection names this architecture has (see LORA_TARGET_FAMILIES)."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in LORA_TARGET_FAMILIES:
        if all(name in leaf_names for name in family):
            return list(family)
    raise ValueError("cannot tell this model's attention projections; set train.lora.target_modules in the config")


def apply_lora(model: nn.Module, settings: LoraSettings, token_ids: list[int] | None = None) -> Any:
    """Wrap `model` in a peft LoRA adapter; only the adapter's weights train — plus, given `token_ids`, those rows
    of the (tied) embedding (peft's trainable tokens), e.g. a base model's barely-trained chat-template tokens."""
    targets = settings.target_modules or default_lora_targets(model)
    extra: dict[str, Any] = {}
    if token_ids:
        embedding = model.get_input_embeddings()
        name = next(n for n, module in model.named_modules() if module is embedding).rsplit(".", 1)[-1]
        extra["trainable_token_indices"] = {name: sorted(set(token_ids))}
    if settings.last_layers:
        layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        if settings.last_layers < layers:  # backward then stops at the lowest adapted layer
            extra["layers_to_transform"] = list(range(layers - settings.last_layers, layers))
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, task_type="CAUSAL_LM", **extra)
    return get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters); tied weights are counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return total, trainable
