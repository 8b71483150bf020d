"""`chatforge ensemble`: a probability ensemble averages its members' softmaxes (and decodes incrementally with their
KV caches); a soup averages same-base runs' weights into one plain model; mismatched runs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatforge.manifest import sha256_file
from chatforge.models.run import EnsembleModel, forward_step, load_run
from chatforge.train.ensemble import EnsembleError, make_ensemble, normalise_weights, parse_weights
from tests.models.test_run import logits_of, prepared_dataset, tiny_run
from tests.tiny_models import build_tiny_llama, build_tiny_tokenizer

PROMPT_IDS = torch.tensor([[2, 4, 40, 41, 42, 43, 5, 4, 50, 51, 52]])
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """Two full and two LoRA runs on the tiny base, one on another base (same tokenizer), one on another vocabulary."""
    root = tmp_path_factory.mktemp("ensemble")
    dataset = prepared_dataset(root, tiny_model_dir)
    other_base = build_tiny_llama(root / "other-base", tiny_tokenizer_dir, seed=1)
    small_vocab = build_tiny_llama(root / "small-vocab", build_tiny_tokenizer(root / "small-tok", vocab_size=2048))
    return {
        "full_a": tiny_run(dataset, tiny_model_dir, root / "full_a", "full", seed=0, lr=3e-3),
        "full_b": tiny_run(dataset, tiny_model_dir, root / "full_b", "full", seed=1, lr=1e-2),
        "lora_a": tiny_run(dataset, tiny_model_dir, root / "lora_a", "lora", seed=0, lr=1e-2),
        "lora_b": tiny_run(dataset, tiny_model_dir, root / "lora_b", "lora", seed=1, lr=2e-2),
        "other_base": tiny_run(dataset, other_base, root / "other_base", "lora", max_steps=1),
        "small_vocab": tiny_run(dataset, small_vocab, root / "small_vocab", "full", max_steps=1),
    }


def probabilities(run: Path) -> torch.Tensor:
    return torch.softmax(logits_of(load_run(run).model, PROMPT_IDS), dim=-1)


def test_ensemble_of_a_run_with_itself_gives_the_runs_own_probabilities(runs: dict[str, Path], tmp_path: Path) -> None:
    out = make_ensemble([runs["full_a"], runs["full_a"]], tmp_path / "twice")
    loaded = load_run(out)
    assert loaded.kind == "ensemble" and isinstance(loaded.model, EnsembleModel) and not loaded.model.training
    assert loaded.stop_token_ids == [5, 1]
    log_probs = logits_of(loaded.model, PROMPT_IDS)
    assert torch.allclose(log_probs.exp(), probabilities(runs["full_a"]), atol=1e-6)


def test_ensemble_averages_member_softmaxes_with_the_given_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    out = make_ensemble([runs["full_a"], runs["lora_b"]], tmp_path / "mix", weights=[1.0, 3.0])
    spec = json.loads((out / "ensemble.json").read_text())
    assert [m["weight"] for m in spec["members"]] == [0.25, 0.75]
    assert spec["members"][0]["run"] == str(runs["full_a"].resolve())
    first, second = probabilities(runs["full_a"]), probabilities(runs["lora_b"])
    assert not torch.allclose(first, second, atol=1e-4)
    mixed = logits_of(load_run(out).model, PROMPT_IDS).exp()
    assert torch.allclose(mixed, 0.25 * first + 0.75 * second, atol=1e-6)
    assert torch.allclose(mixed.sum(-1), torch.ones(1), atol=1e-5)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "ensemble" and manifest["outputs"]["kind"] == "ensemble"
    members = manifest["lineage"]["members"]
    expected_hashes = [sha256_file(runs[name] / "manifest.json") for name in ("full_a", "lora_b")]
    assert [m["manifest_sha256"] for m in members] == expected_hashes
    assert (out / "chat_template.jinja").read_text() == (runs["full_a"] / "chat_template.jinja").read_text()


def test_incremental_decoding_with_member_caches_matches_the_full_forward(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    model = load_run(make_ensemble([runs["full_b"], runs["lora_a"], runs["other_base"]], tmp_path / "three")).model
    prefix = 6
    with torch.no_grad():
        out = model(PROMPT_IDS[:, :prefix], attention_mask=torch.ones(1, prefix, dtype=torch.long), use_cache=True)
        assert isinstance(out.past_key_values, tuple) and len(out.past_key_values) == 3
        cache = out.past_key_values
        for end in range(prefix + 1, PROMPT_IDS.shape[1] + 1):  # one new token at a time, as decoding does
            new_token, mask = PROMPT_IDS[:, end - 1 : end], torch.ones(1, end, dtype=torch.long)
            if end % 2:  # transformers' old and new names for the cache argument both work
                out = model(new_token, attention_mask=mask, past_key_values=cache, use_cache=True)
                logits, cache = out.logits, out.past_key_values
            else:
                logits, cache = forward_step(model, new_token, cache, attention_mask=mask)
            full = model(PROMPT_IDS[:, :end]).logits[:, -1]
            assert torch.allclose(logits[:, -1], full, atol=1e-5), end


def test_runs_with_different_vocabularies_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EnsembleError, match="vocabulary differs.*must share a tokenizer"):
        make_ensemble([runs["full_a"], runs["small_vocab"]], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_soup_of_two_lora_runs_is_the_average_of_their_merged_weights(
    runs: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    out = make_ensemble([runs["lora_a"], runs["lora_b"]], tmp_path / "soup", weights=[0.25, 0.75], soup=True)

    def merged_by_hand(run: Path) -> dict[str, torch.Tensor]:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return PeftModel.from_pretrained(base, run / "model").merge_and_unload().state_dict()

    first, second = merged_by_hand(runs["lora_a"]), merged_by_hand(runs["lora_b"])
    assert not torch.allclose(first[Q_PROJ], second[Q_PROJ], atol=1e-5)
    soup = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()  # plain transformers, no chatforge
    assert torch.allclose(soup[Q_PROJ], 0.25 * first[Q_PROJ] + 0.75 * second[Q_PROJ], atol=1e-6)
    assert torch.allclose(soup["model.embed_tokens.weight"], first["model.embed_tokens.weight"])  # LoRA left it
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["kind"] == "full" and manifest["lineage"]["method"] == "soup"
    assert [m["weight"] for m in manifest["lineage"]["members"]] == [0.25, 0.75]
    member_manifest = json.loads((runs["lora_a"] / "manifest.json").read_text())
    assert manifest["lineage"]["base_model"] == member_manifest["lineage"]["base_model"]
    assert load_run(out).kind == "full"


def test_soup_of_full_runs_averages_every_parameter(runs: dict[str, Path], tmp_path: Path) -> None:
    out = make_ensemble([runs["full_a"], runs["full_b"]], tmp_path / "soup", soup=True)
    first, second = (AutoModelForCausalLM.from_pretrained(runs[name] / "model").state_dict()
                     for name in ("full_a", "full_b"))
    soup = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for name in (Q_PROJ, "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.allclose(soup[name], (first[name] + second[name]) / 2, atol=1e-6), name


def test_soup_of_runs_from_different_bases_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EnsembleError, match="different base model.*without --soup"):
        make_ensemble([runs["lora_a"], runs["other_base"]], tmp_path / "bad", soup=True)
    assert not (tmp_path / "bad").exists()


def test_bad_weights_and_non_runs_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    assert parse_weights("0.5,0.5") == [0.5, 0.5] and parse_weights(None) is None
    assert normalise_weights(None, 4) == [0.25] * 4
    with pytest.raises(EnsembleError, match="comma-separated"):
        parse_weights("half,half")
    with pytest.raises(EnsembleError, match="3 weights for 2 runs"):
        make_ensemble([runs["full_a"], runs["full_b"]], tmp_path / "e", weights=[1, 1, 1])
    with pytest.raises(EnsembleError, match="positive"):
        make_ensemble([runs["full_a"], runs["full_b"]], tmp_path / "e", weights=[1, -1])
    with pytest.raises(EnsembleError, match="at least two runs"):
        make_ensemble([runs["full_a"]], tmp_path / "e")
    with pytest.raises(EnsembleError, match="not a finished chatforge run"):
        make_ensemble([runs["full_a"], tmp_path], tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="no such run"):
        make_ensemble([runs["full_a"], tmp_path / "missing"], tmp_path / "e")
    with pytest.raises(EnsembleError, match="not empty"):
        make_ensemble([runs["full_a"], runs["full_b"]], runs["full_b"])
