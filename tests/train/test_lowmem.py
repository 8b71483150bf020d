"""A LoRA run's memory savings, each on by default and opt-out-able: train.base_storage bf16 (the frozen base is
stored in 16 bits, never saved in fp32 for backward, computes like an fp32 model whose weights were rounded to bf16)
and gradient checkpointing; with both, the loss curve stays within 1 % of the all-fp32, no-checkpointing run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from chatforge.config import LoraSettings, TrainConfig
from chatforge.core.loss import CausalLMLoss
from chatforge.models.source import drop_build_tables
from chatforge.train.lowmem import UpcastLinear, low_precision_copy, store_frozen_base
from chatforge.train.model import apply_lora, load_base_model, load_training_model, uses_gradient_checkpointing
from chatforge.train.monitor import read_metrics
from tests.models.test_run import prepared_dataset, tiny_run


def lora_pair(model_dir: Path) -> tuple[nn.Module, nn.Module]:
    """(16-bit stored base + LoRA, fp32 base with the same bf16-rounded weights + the same LoRA)."""
    torch.manual_seed(0)
    low = load_base_model(model_dir, torch.float32)
    store_frozen_base(low, torch.bfloat16)
    reference = load_base_model(model_dir, torch.float32)
    with torch.no_grad():
        for (name, mine), (_, theirs) in zip(low.named_parameters(), reference.named_parameters()):
            theirs.copy_(mine.float())
    settings = LoraSettings(r=4, dropout=0.0)
    torch.manual_seed(1)
    low = apply_lora(low, settings)
    torch.manual_seed(1)
    reference = apply_lora(reference, settings)
    with torch.no_grad():  # lora_B starts at zero: give it values so that its gradient path is exercised
        for (_, mine), (_, theirs) in zip(low.named_parameters(), reference.named_parameters()):
            if mine.requires_grad:
                theirs.copy_(mine.normal_(0, 0.02))
    return low, reference


def batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_frozen_weights_are_16_bit_and_the_rest_fp32(tiny_model_dir: Path) -> None:
    model = load_base_model(tiny_model_dir, torch.float32)
    stored = store_frozen_base(model, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is UpcastLinear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    others = [p for n, p in model.named_parameters() if "norm" in n]
    assert others and all(p.dtype == torch.float32 for p in others)
    total_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert stored > 0.9 * sum(p.numel() for p in model.parameters()) and total_bytes < 0.6 * 4 * stored


def test_loss_and_lora_gradients_match_fp32_compute_on_rounded_weights(tiny_model_dir: Path) -> None:
    low, reference = lora_pair(tiny_model_dir)
    inputs = batch(low.get_input_embeddings().weight.shape[0])
    results = []
    for model in (low, reference):
        loss_sum, n_tokens, _ = CausalLMLoss(model, chunk_size=16)(**inputs)
        (loss_sum / n_tokens).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss_sum.detach() / n_tokens), grads))
    (low_loss, low_grads), (ref_loss, ref_grads) = results
    assert low_loss == pytest.approx(ref_loss, rel=1e-5)
    assert low_grads.keys() == ref_grads.keys() and low_grads
    for name in ref_grads:
        torch.testing.assert_close(low_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_backward_never_saves_an_fp32_copy_of_a_frozen_weight(tiny_model_dir: Path) -> None:
    low, _ = lora_pair(tiny_model_dir)
    frozen = [m.weight for m in low.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.requires_grad]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        CausalLMLoss(low, chunk_size=16)(**batch(low.get_input_embeddings().weight.shape[0]))
    upcast_copies = [t for t in saved for w in frozen
                     if t.dtype == torch.float32 and t.shape == w.shape and torch.equal(t, w.float())]
    assert frozen and not upcast_copies, [tuple(t.shape) for t in upcast_copies]
    assert any(t.dtype == torch.bfloat16 for t in saved)  # the 16-bit weights are what backward keeps


def test_low_precision_copy_is_written_once_in_bf16(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    assert low_precision_copy(tiny_model_dir, torch.bfloat16) == tiny_model_dir  # small: converted in-process
    copy = Path(low_precision_copy(tiny_model_dir, torch.bfloat16, min_bytes=0))
    with safe_open(str(next(copy.glob("*.safetensors"))), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable) == {torch.bfloat16}
    stamp = (copy / "lowmem.json").stat().st_mtime_ns
    assert Path(low_precision_copy(tiny_model_dir, torch.bfloat16, min_bytes=0)) == copy
    assert (copy / "lowmem.json").stat().st_mtime_ns == stamp


def test_default_lora_run_loss_curve_within_one_percent_of_fp32_over_20_steps(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    dataset = prepared_dataset(tmp_path, tiny_model_dir)
    curves = {}
    for name, options in (("fp32", {"base_storage": "fp32", "gradient_checkpointing": False}), ("default", {})):
        run = tiny_run(dataset, tiny_model_dir, tmp_path / name, "lora", lr=1e-2, max_steps=20, log_every=1, **options)
        curves[name] = [m["train/loss"] for m in read_metrics(run) if "train/loss" in m]
    assert len(curves["fp32"]) == 20 and curves["fp32"][-1] < curves["fp32"][0] - 0.3  # it learned
    worst = max(abs(a - b) / a for a, b in zip(curves["fp32"], curves["default"]))
    assert worst < 0.01, (worst, curves)


def test_lora_defaults_to_bf16_storage_and_checkpointing_each_opt_out(tiny_model_dir: Path, tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert TrainConfig().base_storage == "bf16"
    assert uses_gradient_checkpointing(TrainConfig(method="lora"))
    assert not uses_gradient_checkpointing(TrainConfig(method="full"))
    assert not uses_gradient_checkpointing(TrainConfig(method="lora", gradient_checkpointing=False))
    assert uses_gradient_checkpointing(TrainConfig(method="full", gradient_checkpointing=True))
    default = load_training_model(tiny_model_dir, TrainConfig(), tokenizer)
    assert default.is_activation_checkpointing and default.get_input_embeddings().weight.dtype == torch.bfloat16
    plain = load_training_model(tiny_model_dir, TrainConfig(base_storage="fp32", gradient_checkpointing=False), tokenizer)
    assert not plain.is_activation_checkpointing and plain.get_input_embeddings().weight.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(tiny_model_dir: Path) -> None:
    low, _ = lora_pair(tiny_model_dir)
    inputs = batch(low.get_input_embeddings().weight.shape[0])
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            low.activation_checkpointing_enable()
        low.train()
        low.zero_grad()
        loss_sum, n_tokens, _ = CausalLMLoss(low, chunk_size=16)(**inputs)
        (loss_sum / n_tokens).backward()
        results.append((loss_sum.item(), {n: p.grad.clone() for n, p in low.named_parameters() if p.requires_grad}))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    assert loss_checkpointed == pytest.approx(loss_plain, rel=1e-6) and grads_plain
    for name, grad in grads_plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_bf16_storage_merge_is_the_fp32_base_plus_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    dataset = prepared_dataset(tmp_path, tiny_model_dir)
    adapter = tiny_run(dataset, tiny_model_dir, tmp_path / "lora", "lora", lr=1e-2, base_storage="bf16")
    merged = tiny_run(dataset, tiny_model_dir, tmp_path / "merged", "lora", lr=1e-2, base_storage="bf16", merge=True)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter / "model")  # the fp32 base + the adapter
    plain = AutoModelForCausalLM.from_pretrained(merged / "model")
    assert plain.get_input_embeddings().weight.dtype == torch.float32
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, plain(ids).logits, atol=1e-4)


def test_gemma_tokenizer_drops_its_python_tables_and_still_encodes_and_saves(tmp_path: Path) -> None:
    """load_tokenizer frees the Python copies of the vocabulary and merges (the Rust tokenizer keeps its own)."""
    from transformers import AutoTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "h": 4, "e": 5, "l": 6, "o": 7, "▁": 8, "he": 9,
             "ll": 10, "hell": 11, "hello": 12, "▁hello": 13}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "hello")]
    tokenizer = GemmaTokenizer(vocab=dict(vocab), merges=list(merges))
    before, size = tokenizer("hello hello").input_ids, len(tokenizer)
    drop_build_tables(tokenizer)
    assert tokenizer._vocab == {} and tokenizer._merges == []
    assert tokenizer("hello hello").input_ids == before and len(tokenizer) == size
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")("hello hello").input_ids == before
