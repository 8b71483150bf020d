"""What a finished run leaves behind: RUN/model (loadable without chatforge), the template, config and manifest.

Use it like this (as `train` does)::

    write_run_files(run_dir, cfg, tokenizer, base_location)       # at the start: config.yaml, chat_template.jinja
    export_run(run_dir, model, tokenizer, cfg, base_location, manifest, final, best_val_loss)   # + model card

RUN/model holds either a peft adapter (adapter_config.json points at the base model directory) or, for full
fine-tuning and `merge: true`, a complete model; the tokenizer with its chat template is saved beside it, so
`AutoTokenizer.from_pretrained(RUN/model).apply_chat_template(...)` renders exactly what training saw.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from chatforge.config import TrainConfig
from chatforge.core.rundir import RunDir
from chatforge.manifest import MANIFEST_NAME, Manifest, sha256_file
from chatforge.models.model_card import write_model_card
from chatforge.models.run import stop_token_ids
from chatforge.models.source import file_sha256, resolve_model_source
from chatforge.train.model import load_base_model


def base_model_fingerprint(spec: str | None, base_location: Any) -> dict[str, Any]:
    """How to tell later which base a run was trained from: the GGUF's sha256, or a hash of the dir's config and
    weight file sizes (hashing GBs of weights on every run would cost more than it tells)."""
    source = resolve_model_source(spec)
    if source.kind == "gguf":
        return {"kind": "gguf", "path": source.location, "sha256": file_sha256(Path(source.location)),
                "converted_dir": str(base_location)}
    if source.kind == "hub":
        return {"kind": "hub", "id": source.location}
    directory = Path(source.location)
    digest = hashlib.sha256((directory / "config.json").read_bytes() if (directory / "config.json").exists() else b"")
    for weights in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return {"kind": "hf_dir", "path": str(directory.resolve()), "fingerprint": digest.hexdigest()}


def write_run_files(run_dir: Path, cfg: TrainConfig, tokenizer: Any, base_location: Any) -> None:
    """The resolved config and the exact chat template, written before the first step."""
    run = RunDir(run_dir)
    run.write_train_config(cfg)
    run.template_file.write_text(tokenizer.chat_template, encoding="utf-8")


def merge_into_fp32_base(model: Any, base_location: Any, tokenizer: Any) -> Any:
    """The trained adapter merged into the original fp32 base (not the 16-bit copy it trained on, train.lowmem), so
    the merged model computes exactly what the base + adapter loaded with peft compute."""
    base = load_base_model(base_location, torch.float32)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    with tempfile.TemporaryDirectory(prefix="chatforge-merge-") as adapter_dir:
        model.save_pretrained(adapter_dir)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def export_run(
    run_dir: Path, model: Any, tokenizer: Any, cfg: TrainConfig, base_location: Any, manifest: Manifest,
    final: dict[str, Any], best_val_loss: float | None,
) -> Path:
    """Save RUN/model (adapter, merged or full) with the tokenizer, and RUN/manifest.json with the lineage."""
    run = RunDir(run_dir)
    out = run.model_dir
    out.mkdir(parents=True, exist_ok=True)
    is_adapter = hasattr(model, "peft_config")
    if is_adapter and cfg.merge:
        model = merge_into_fp32_base(model, base_location, tokenizer) if cfg.base_storage != "fp32" else model.merge_and_unload()
        is_adapter = False
    if not is_adapter and getattr(model, "generation_config", None) is not None:
        # plain `generate` should stop where the chat template ends a turn, not only at eos
        model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if is_adapter:  # point the adapter at the exact base directory it was trained on
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = str(Path(base_location).resolve()) if Path(str(base_location)).exists() else str(base_location)
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))

    data_manifest = Path(cfg.data or "") / MANIFEST_NAME
    for name in ("train.jsonl", "val.jsonl"):
        path = Path(cfg.data or "") / name
        if path.exists():
            manifest.add_input(path)
    manifest.extra["lineage"] = {
        "dataset_dir": str(Path(cfg.data or "").resolve()),
        "dataset_manifest_sha256": sha256_file(data_manifest) if data_manifest.exists() else None,
        "base_model": base_model_fingerprint(cfg.model, base_location),
    }
    manifest.outputs = {"model": RunDir.MODEL_DIR, "kind": "adapter" if is_adapter else "full",
                        "chat_template": RunDir.TEMPLATE_FILE, "metrics": RunDir.METRICS_FILE,
                        "tensorboard": RunDir.TENSORBOARD_DIR, "checkpoints": RunDir.CHECKPOINTS_DIR}
    manifest.counts = {**final, "best_val_loss": best_val_loss}
    manifest.write(run_dir)
    write_model_card(run_dir)  # RUN/model/README.md (replaces the stub peft's save_pretrained writes)
    return out
