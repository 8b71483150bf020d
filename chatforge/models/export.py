"""`chatforge export`: a run as a plain Hugging Face model directory, or as one GGUF file for llama.cpp / Ollama.

Use it like this::

    export_hf("runs/r1", Path("exports/r1-hf"))                  # adapter merged into its base, chat template included
    export_gguf("runs/r1", Path("exports/r1.gguf"), quant="q8_0")   # f16 | q8_0 | f32; chat template embedded
    cached_gguf("runs/r1")              # the run as GGUF under ~/.cache/chatforge/gguf/, made once per run hash

The GGUF conversion is llama.cpp's own `convert_hf_to_gguf.py`, taken from the llama-cpp-python source package
(pinned below) the first time it is needed: `pip download` fetches the sdist from PyPI into
~/.cache/chatforge/llama.cpp/ and only the converter and its `gguf-py` are unpacked. No compiler is involved; the
llama-cpp-python extra (which compiles for minutes) is needed only to *run* the GGUF, not to make it.

Each export writes a manifest.json next to its output and records itself under RUN/exports/NAME/manifest.json,
so `chatforge lineage RUN` lists it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from chatforge.core.rundir import RunDir
from chatforge.manifest import Manifest, sha256_file
from chatforge.models.llamacpp_build import (
    LLAMA_CPP_PYTHON_VERSION,
    LlamaCppBuildError,
    extract_vendored,
    llama_cpp_root,
)
from chatforge.models.model_card import CARD_FILE
from chatforge.models.run import find_run, load_run, stop_token_ids
from chatforge.models.source import cache_root, resolve_model_source

GGUF_QUANTS = ("f16", "q8_0", "f32")


class ExportError(ValueError):
    """The run cannot be exported as asked (not a run, an ensemble to GGUF, a failed conversion)."""


def export_hf(run: Path | str, out_dir: Path, device: str = "auto") -> Path:
    """Save the run's model (adapter merged on `device`) + tokenizer with its chat template and the model card
    (README.md) under out_dir; return out_dir."""
    files = _single_model_run(run)
    manifest = Manifest.start("export", config={"format": "hf", "run": str(files.run_dir.resolve())})
    _save_hf(files, out_dir, manifest, device)
    manifest.extra["format"] = "hf"
    manifest.outputs = {"model": str(out_dir.resolve())}
    _record(manifest, files.run_dir, out_dir)
    return out_dir


def _single_model_run(run: Path | str) -> Any:
    files = find_run(run)
    if files is None or files.run_dir is None:
        raise ExportError(f"{run}: not a chatforge run directory (no {RunDir.MODEL_DIR}/ or {RunDir.ENSEMBLE_FILE})")
    if files.kind == "ensemble":
        raise ExportError(f"{run}: a probability ensemble is several models; export a --soup ensemble or one member")
    return files


def _save_hf(files: Any, out_dir: Path, manifest: Manifest, device: str = "auto") -> None:
    run = RunDir(files.run_dir)
    if run.manifest_file.is_file():
        manifest.add_input(run.manifest_file, role="run")
    with manifest.timed("load_merge"):
        loaded = load_run(files.run_dir, dtype=torch.float32, device=device)  # fp32: the export loses nothing
    model = loaded.model
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stop_token_ids(loaded.tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    with manifest.timed("save"):
        model.save_pretrained(out_dir)
        loaded.tokenizer.save_pretrained(out_dir)
    card = run.model_dir / CARD_FILE
    if card.is_file():  # the run's model card (models.model_card), not a stub from save_pretrained
        shutil.copy2(card, out_dir / CARD_FILE)


def export_gguf(run: Path | str, out_file: Path, quant: str = "q8_0", device: str = "auto") -> Path:
    """Convert the run to one GGUF file (see the module docstring); return its path."""
    if quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant}: choose one of {', '.join(GGUF_QUANTS)}")
    files = _single_model_run(run)
    converter = llama_cpp_converter()
    manifest = Manifest.start("export", config={"format": "gguf", "quant": quant, "run": str(files.run_dir.resolve()),
                                                "converter": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chatforge-export-") as tmp:
        hf_dir = Path(tmp) / "hf"
        _save_hf(files, hf_dir, manifest, device)
        with manifest.timed("convert"):
            result = subprocess.run(
                [sys.executable, str(converter), str(hf_dir), "--outfile", str(out_file), "--outtype", quant],
                env={**_clean_env(), "PYTHONPATH": str(converter.parent / "gguf-py")},
                capture_output=True, text=True, check=False,
            )
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ExportError(f"GGUF conversion of {files.run_dir} failed (llama.cpp convert_hf_to_gguf.py):\n{tail}")
    template = gguf_chat_template(out_file)
    if not template:
        raise ExportError(f"{out_file}: the converter wrote no tokenizer.chat_template; the run's tokenizer has none?")
    manifest.extra["format"] = "gguf"
    manifest.outputs = {"gguf": str(out_file.resolve()), "bytes": out_file.stat().st_size}
    _record(manifest, files.run_dir, out_file.parent, name=out_file.stem)
    return out_file


def cached_gguf(run: Path | str, quant: str = "q8_0") -> Path:
    """The run exported to GGUF in the cache (what `serve --backend llamacpp RUN` serves): made on the first call,
    then reused while the run's weights and tokenizer files hash the same."""
    files = _single_model_run(run)
    digest = hashlib.sha256()
    for directory in sorted({files.weights_dir, files.tokenizer_dir}):
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(directory)}\0{sha256_file(path)}\0".encode())
    out_file = cache_root() / "gguf" / f"{files.run_dir.name}-{digest.hexdigest()[:16]}-{quant}.gguf"
    if not out_file.is_file():
        out_file.parent.mkdir(parents=True, exist_ok=True)
        partial = out_file.with_name(out_file.stem + ".partial.gguf")
        export_gguf(run, partial, quant=quant)
        partial.replace(out_file)  # a failed or interrupted export never leaves a file that looks done
    return out_file


def gguf_to_serve(run: str | None, gguf: str | None, quant: str = "q8_0") -> Path:
    """The GGUF file llama.cpp serves: `gguf` as it is; else the run exported to GGUF (`cached_gguf`); else the
    GGUF a model spec names (a packaged model such as smollm2-135m-instruct, or a .gguf path)."""
    if gguf:
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file (serve.gguf); make one with chatforge export RUN --gguf")
        return path
    if not run:
        raise ValueError("serving through llama.cpp needs serve.gguf or serve.run")
    if find_run(run) is not None:
        return cached_gguf(run, quant)
    source = resolve_model_source(run)
    if source.kind != "gguf":
        raise ValueError(f"serve.run {run!r} is a {source.kind} model, not a run or a GGUF: export it with "
                         "`chatforge export` or serve it with --backend torch")
    return Path(source.location)


def gguf_chat_template(path: Path) -> str | None:
    """The chat template embedded in a GGUF file (tokenizer.chat_template), or None."""
    value = read_gguf_metadata(path, {"tokenizer.chat_template"}).get("tokenizer.chat_template")
    return value if isinstance(value, str) else None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path, keys: set[str]) -> dict[str, Any]:
    """The scalar or string values of `keys` from a GGUF header (other values, such as the 262k-entry token list,
    are skipped without being decoded: gguf.GGUFReader takes ~50 s on such a file, this well under a second)."""
    found: dict[str, Any] = {}
    with path.open("rb") as handle:
        def read(fmt: str) -> Any:
            return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]

        def read_string() -> bytes:
            return handle.read(read("<Q"))

        def skip_value(kind: int) -> None:
            if kind == _STRING:
                handle.seek(read("<Q"), 1)
            elif kind == _ARRAY:
                item_kind, count = read("<I"), read("<Q")
                if item_kind in _SCALARS:
                    handle.seek(struct.calcsize(_SCALARS[item_kind]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item_kind)
            else:
                handle.seek(struct.calcsize(_SCALARS[kind]), 1)

        if handle.read(4) != b"GGUF":
            raise ExportError(f"{path}: not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = read_string().decode("utf-8")
            kind = read("<I")
            if key in keys and kind == _STRING:
                found[key] = read_string().decode("utf-8")
            elif key in keys and kind in _SCALARS:
                found[key] = read(_SCALARS[kind])
            else:
                skip_value(kind)
    return found


def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its gguf-py, unpacked once from the pinned llama-cpp-python sdist."""
    script = llama_cpp_root() / "convert_hf_to_gguf.py"
    if not script.is_file():
        try:
            extract_vendored(script.parent, ("convert_hf_to_gguf.py", "gguf-py/", "conversion/"))
        except LlamaCppBuildError as exc:
            raise ExportError(f"GGUF export needs llama.cpp's converter: {exc}") from None
    return script


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _record(manifest: Manifest, run_dir: Path, out_dir: Path, name: str | None = None) -> None:
    """Write the manifest next to the output and under RUN/exports/NAME/ for lineage."""
    manifest.write(out_dir)
    record_dir = RunDir(run_dir).export_dir(name or out_dir.name)
    record_dir.mkdir(parents=True, exist_ok=True)
    manifest.write(record_dir)

