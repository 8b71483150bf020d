"""Where base models come from: HF dirs, .gguf files, hub ids, the packaged default; the GGUF conversion cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import transformers

from chatforge.config import FitConfig
from chatforge.data.fit import fit_records
from chatforge.models.source import (
    DEFAULT_MODEL,
    ModelSource,
    cache_root,
    file_sha256,
    load_tokenizer,
    model_dir,
    resolve_model_source,
    tokenizer_dir,
)


@pytest.fixture()
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHATFORGE_CACHE", str(cache))
    return cache


def test_cache_root_follows_chatforge_cache(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_root() == tmp_cache
    monkeypatch.delenv("CHATFORGE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "chatforge"


def test_a_directory_with_model_or_tokenizer_files_is_an_hf_dir(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_source(str(tiny_tokenizer_dir)) == ModelSource("hf_dir", str(tiny_tokenizer_dir))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    assert resolve_model_source(str(config_only)).kind == "hf_dir"


def test_hf_dirs_and_hub_ids_load_from_where_they_are(tiny_tokenizer_dir: Path) -> None:
    assert tokenizer_dir(str(tiny_tokenizer_dir)) == tiny_tokenizer_dir
    assert model_dir(str(tiny_tokenizer_dir)) == tiny_tokenizer_dir
    assert tokenizer_dir("google/gemma-3-270m") == "google/gemma-3-270m"
    assert model_dir("google/gemma-3-270m") == "google/gemma-3-270m"


def test_a_directory_without_model_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directory has no config.json or tokenizer files"):
        resolve_model_source(str(tmp_path))


def test_gguf_paths_resolve_and_a_missing_one_is_named(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == ModelSource("gguf", str(gguf))
    assert resolve_model_source(str(tmp_path)) == ModelSource("gguf", str(gguf))  # a dir holding one .gguf
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=f"model '{missing}': no such GGUF file"):
        resolve_model_source(str(missing))


def test_an_org_name_that_is_not_a_local_path_is_a_hub_id() -> None:
    assert resolve_model_source("google/gemma-3-270m") == ModelSource("hub", "google/gemma-3-270m")
    assert resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct").kind == "hub"


@pytest.mark.parametrize("spec", ["gemma", "not a model", "", "gemma3-270m-it", "weights.bin"])
def test_anything_else_is_a_value_error_that_lists_what_is_accepted(spec: str) -> None:
    with pytest.raises(ValueError, match="expected an HF model directory, a .gguf file, a hub id"):
        resolve_model_source(spec)


@pytest.mark.parametrize("spec", ["./runs/base", "runs/base/final", "~/no/such/dir"])
def test_a_missing_local_path_is_not_taken_for_a_hub_id(spec: str) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model_source(spec)


def test_file_sha256_is_remembered_until_the_file_changes(tmp_cache: Path, tmp_path: Path) -> None:
    data = tmp_path / "blob.bin"
    data.write_bytes(b"hello")
    assert file_sha256(data) == hashlib.sha256(b"hello").hexdigest()
    memo_path = tmp_cache / "sha256.json"
    memo = json.loads(memo_path.read_text())
    memo[str(data.resolve())]["sha256"] = "remembered"
    memo_path.write_text(json.dumps(memo))
    assert file_sha256(data) == "remembered"  # not recomputed
    data.write_bytes(b"hello!")
    assert file_sha256(data) == hashlib.sha256(b"hello!").hexdigest()


def test_load_tokenizer_gives_a_tokenizer_without_a_template_one(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    assert not (plain / "chat_template.jinja").exists()
    assert "<start_of_turn>model" in load_tokenizer(str(plain)).chat_template
    assert "<|im_start|>" in load_tokenizer(str(plain), chat_template="chatml").chat_template


def test_default_model_tokenizer_is_converted_once_and_then_loaded_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one test with the real default model (~40 s the first time, cached after in the user's cache)."""
    assert resolve_model_source(None) == resolve_model_source(DEFAULT_MODEL)
    converted = tokenizer_dir(None)  # converts on the first run ever
    assert isinstance(converted, Path) and converted.parent == cache_root() / "hf"
    stamp = (converted / "tokenizer.json").stat().st_mtime_ns

    gguf = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    gguf_stamp = gguf.stat().st_mtime_ns
    calls: list[dict] = []
    real_from_pretrained = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    tokenizer = load_tokenizer(None)
    assert [c.get("gguf_file") for c in calls] == [None]  # loaded from the converted dir, not the GGUF
    assert (converted / "tokenizer.json").stat().st_mtime_ns == stamp  # not converted again
    assert gguf.stat().st_mtime_ns == gguf_stamp  # nor the GGUF assembled again

    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    assert "<start_of_turn>model" in tokenizer.chat_template  # the GGUF has none: "gemma" picked by vocabulary

    # fit's fast counts are exact for Gemma's tokenizer, tricky text included
    tricky = ["plain words.", "  indented\n\tcode()  ", "> </b> <b>bold</b>", "emoji 😀 naïve 日本語", "a  b   c",
              "[multimodal] <start_of_turn> literal", "line\n\n\nbreaks\n", "x" * 300, "ends with space "]
    records = [
        {"id": str(i), "meta": {}, "messages": [{"role": "system", "content": t}, {"role": "user", "content": t},
                                               {"role": "assistant", "content": t[::-1]}]}
        for i, t in enumerate(tricky)
    ]
    result = fit_records(records, tokenizer, FitConfig(max_tokens=100_000))
    exact = [len(tokenizer.apply_chat_template(r["messages"], return_dict=False)) for r in records]
    assert result.token_counts == exact
