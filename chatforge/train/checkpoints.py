"""Checkpoints a run can resume from: trainable weights, optimizer, scheduler, RNG and the data position.

Use it like this::

    save_checkpoint(run.checkpoints_dir, step, model, optimizer, scheduler, state={"cursor": 40, ...}, keep=2)
    path = latest_checkpoint(run.checkpoints_dir)          # None when there is none (run: a core.rundir.RunDir)
    state = load_checkpoint(path, model, optimizer, scheduler)

A checkpoint is written to a temporary folder and renamed into place, so a kill mid-write never leaves a half
checkpoint that `--resume` would pick up. Only trainable parameters are saved (the LoRA adapter, or every weight in
full fine-tuning); the frozen base is reloaded from the base model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chatforge.core.rundir import RunDir

STEP_PREFIX = "step-"
BEST = RunDir.BEST_CHECKPOINT
WEIGHTS = "trainable.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached and contiguous (what a checkpoint stores)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, path: Path) -> None:
    """Load weights saved by `trainable_state` into `model`; every saved name must exist."""
    saved = load_file(str(path))
    parameters = dict(model.named_parameters())
    missing = [name for name in saved if name not in parameters]
    if missing:
        raise ValueError(f"{path}: checkpoint has weights the model lacks, e.g. {missing[:3]}; wrong base model?")
    with torch.no_grad():
        for name, tensor in saved.items():
            parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))


# numpy's RNG state holds a uint32 array: exactly what rebuilds one is allowed to load, nothing else
NUMPY_RNG_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(target: Path, fill: Any) -> None:
    tmp = target.parent / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    if target.exists():
        old = target.parent / f".old-{target.name}"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def save_checkpoint(
    folder: Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int
) -> Path:
    """Write folder/step-N atomically and delete all but the newest `keep` step checkpoints."""
    target = folder / f"{STEP_PREFIX}{step:08d}"

    def fill(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))

    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, fill)
    for old in sorted(folder.glob(f"{STEP_PREFIX}*"))[:-keep]:
        shutil.rmtree(old)
    return target


def save_best(folder: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write the best weights so far to folder/best (atomically), with the step and val loss that earned it."""
    target = folder / BEST

    def fill(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))

    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, fill)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete step checkpoint in `folder`, or None."""
    steps = sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if (p / "state.json").exists()) if folder.exists() else []
    return steps[-1] if steps else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns its saved training state."""
    load_trainable_state(model, path / WEIGHTS)
    # weights_only: a checkpoint is data, never code (a crafted pickle would run on load otherwise)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
