"""`chatforge export`: --hf writes a merged model that loads without chatforge; --gguf (llama.cpp's converter)
writes one file with the chat template embedded whose logits and greedy answer match the torch run's."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatforge.models.export import ExportError, export_gguf, export_hf, gguf_chat_template
from chatforge.models.generate import SamplingSettings, chat_prompt_ids, generate_batch
from chatforge.models.run import load_run
from chatforge.models.source import DEFAULT_MODEL, tokenizer_dir
from chatforge.models.tiny import build_tiny_gemma3
from chatforge.pipeline import lineage_lines
from tests.models.test_run import prepared_dataset, tiny_run

QUESTION = [{"role": "user", "content": "My router light is red. What should I do?"}]


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run on a tiny random Gemma 3 that uses the default model's real tokenizer."""
    root = tmp_path_factory.mktemp("export")
    base = build_tiny_gemma3(root / "base", tokenizer_dir(DEFAULT_MODEL))
    return tiny_run(prepared_dataset(root, base), base, root / "run", "lora", lr=1e-2)


def greedy(model: torch.nn.Module, ids: list[int], steps: int = 8) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_hf_export_loads_with_plain_transformers_and_answers_like_the_run(gemma_run: Path, tmp_path: Path) -> None:
    out = export_hf(gemma_run, tmp_path / "hf")
    loaded = load_run(gemma_run)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    ids = chat_prompt_ids(tokenizer, QUESTION)
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([ids])).logits, loaded.model(torch.tensor([ids])).logits, atol=1e-5)
    assert "export" in "\n".join(lineage_lines(gemma_run))


def test_gguf_export_embeds_the_template_and_matches_the_torch_model(gemma_run: Path, tmp_path: Path) -> None:
    """f32 so the comparison is exact; f16 and q8_0 are the same converter with another --outtype."""
    path = export_gguf(gemma_run, tmp_path / "run.gguf", quant="f32")
    loaded = load_run(gemma_run)
    assert gguf_chat_template(path) == loaded.tokenizer.chat_template
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = chat_prompt_ids(loaded.tokenizer, QUESTION)
    with torch.no_grad():
        ours, theirs = loaded.model(torch.tensor([ids])).logits, from_gguf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert greedy(from_gguf, ids) == greedy(loaded.model, ids)


def test_gguf_export_runs_in_llama_cpp_when_the_extra_is_installed(gemma_run: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra (llama-cpp-python) is not installed")
    path = export_gguf(gemma_run, tmp_path / "run.gguf", quant="f16")
    loaded = load_run(gemma_run)
    ids = chat_prompt_ids(loaded.tokenizer, QUESTION)
    expected = generate_batch(loaded, [ids], SamplingSettings(max_new_tokens=8))[0].token_ids
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    # generate() never ends by itself: take exactly as many tokens as the torch run made (draining it overflows n_ctx)
    got = list(itertools.islice(llm.generate(ids, temp=0.0, top_k=1), len(expected)))
    assert got == expected


def test_export_refuses_what_is_not_a_single_model_run(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a chatforge run"):
        export_hf(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="--quant"):
        export_gguf(tmp_path, tmp_path / "x.gguf", quant="q4_nonsense")
