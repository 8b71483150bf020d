"""A frozen base in 16-bit storage with fp32 compute: half the weight memory of a LoRA run, the same arithmetic.

Use it like this (as `train` does through `model.load_training_model`)::

    directory = low_precision_copy(model_dir, torch.bfloat16)   # cached bf16 copy, written once by a child process
    model = load_base_model(directory, torch.bfloat16)
    store_frozen_base(model, torch.bfloat16)                     # then apply_lora(model, ...) as usual

After `store_frozen_base` every `nn.Linear` and embedding weight stays in bf16 (2 bytes a weight), and each layer
up-casts its weight to the activations' dtype (fp32 on the CPU) only while it computes, in forward and again in
backward (`UpcastLinear` saves the 16-bit weight, not an fp32 copy). Norms, biases and the LoRA adapters stay fp32,
so the optimizer and every activation are fp32 as before; the one difference from an fp32 run is the rounding of
the frozen weights to bf16. The LM head (tied to the embedding for Gemma) is up-cast a vocabulary slice at a time
inside the chunked loss (core.loss). On this CPU a bf16 matmul is 10-100x slower than fp32, hence the up-cast.

The copy lives in cache_root()/lowmem/ and is written by a child process: converting in the training process would
touch every fp32 page of the source and put that in its peak memory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from chatforge.models.source import cache_root

STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COPY_MARKER = "lowmem.json"
COPY_MIN_BYTES = 256 * 2**20  # smaller checkpoints convert in-process: their fp32 pages cost little, a copy clutters


class _UpcastLinearFunction(torch.autograd.Function):
    """y = x @ W.T + b with W stored in 16 bits: up-cast for the forward, saved in 16 bits, up-cast again for the
    gradient of x. W and b are frozen (no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        compute = _compute_dtype(x)
        return F.linear(x.to(compute), weight.to(compute), None if bias is None else bias.to(compute))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else torch.float32


class UpcastLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight is stored in 16 bits and up-cast per call (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return _UpcastLinearFunction.apply(x, self.weight, self.bias)


def _embedding_to_float(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
    return output.float() if output.is_floating_point() and output.dtype != torch.float32 else output


def store_frozen_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep_embeddings_fp32: bool = False) -> int:
    """Keep `model`'s Linear and embedding weights in `dtype`, frozen, computing in fp32; everything else (norms,
    biases, buffers) becomes fp32. Returns the number of weights now stored in `dtype`.

    `keep_embeddings_fp32` leaves the input embedding (and an LM head tied to it) in fp32, for runs that train
    some of its rows (lora.train_template_tokens).
    """
    embedding = model.get_input_embeddings()
    kept = {id(embedding.weight)} if keep_embeddings_fp32 else set()
    stored: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in kept:
            continue
        if type(module) is nn.Linear or type(module) is UpcastLinear:
            module.__class__ = UpcastLinear
        elif isinstance(module, nn.Embedding):
            module.register_forward_hook(_embedding_to_float)
        else:
            continue
        weight.requires_grad_(False)
        weight.data = weight.data.to(dtype)
        stored.add(id(weight))
    for parameter in model.parameters():
        if id(parameter) not in stored and parameter.is_floating_point():
            parameter.data = parameter.data.float()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(module, name, buffer.float())
    return sum(p.numel() for p in model.parameters() if id(p) in stored)


def low_precision_copy(location: Path | str, dtype: torch.dtype = torch.bfloat16,
                       min_bytes: int = COPY_MIN_BYTES) -> Path | str:
    """A cached copy of the HF model directory `location` with floating-point weights in `dtype` (written once by a
    child process; see the module docstring). A hub id, .bin weights or a checkpoint under COPY_MIN_BYTES are
    returned as they are: from_pretrained converts them in-process."""
    source = Path(str(location))
    if not source.is_dir():
        return location
    weights = sorted(source.glob("*.safetensors"))
    if sum(path.stat().st_size for path in weights) < min_bytes:
        return location
    digest = hashlib.sha256(str(source.resolve()).encode())
    for path in weights + [source / "config.json"]:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_root() / "lowmem" / f"{digest.hexdigest()[:16]}-{str(dtype).removeprefix('torch.')}"
    if not (target / COPY_MARKER).is_file():
        done = subprocess.run([sys.executable, "-m", "chatforge.train.lowmem", str(source), str(target),
                               str(dtype).removeprefix("torch.")], capture_output=True, text=True, check=False)
        if done.returncode != 0 or not (target / COPY_MARKER).is_file():
            raise RuntimeError(f"could not write a {dtype} copy of {source} in {target}: {done.stderr.strip()[-500:]}")
    return target


def write_low_precision_copy(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Convert every *.safetensors of `source` to `dtype` (float tensors only) and copy its JSON files into `target`,
    through a scratch directory renamed into place, so a half-written copy is never used."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    for path in sorted(source.glob("*.json")):
        shutil.copy2(path, scratch / path.name)
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: _converted(handle.get_tensor(name), dtype) for name in handle.keys()}
            metadata = handle.metadata()
        save_file(tensors, str(scratch / path.name), metadata=metadata or {"format": "pt"})
        del tensors
    config_path = scratch / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    (scratch / COPY_MARKER).write_text(json.dumps({"source": str(source.resolve()), "dtype": str(dtype)}), encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    scratch.rename(target)


def _converted(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


if __name__ == "__main__":  # the child process of low_precision_copy: SOURCE TARGET DTYPE
    write_low_precision_copy(Path(sys.argv[1]), Path(sys.argv[2]), getattr(torch, sys.argv[3]))
