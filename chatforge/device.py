"""The one device and dtype policy: where a model runs and in which precision, for every stage.

Use it like this::

    device = resolve_device(cfg.device)          # "auto" | "cpu" | "cuda" | "cuda:N" | "mps" -> torch.device
    loaded = load_run(run, device=device, dtype=inference_dtype(device))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=..., **attention_kwargs())

`auto` takes the first CUDA GPU when there is one, else Apple's MPS, else the CPU. Asking for a device this machine
lacks is a `DeviceError` (a ValueError, so every command prints it as one line) naming what is there instead.
GPUs that compute in bf16 (CUDA compute capability 8.0+, i.e. Ampere and newer) train under bf16 autocast and
serve in bf16; everything else runs in fp32 — on CPUs without bf16 instructions bf16 matmuls are 10-100x slower.
Attention is PyTorch's scaled-dot-product attention (SDPA) wherever the architecture supports it.
"""

from __future__ import annotations

import torch

from chatforge.config import check_device_spec as check_config_device_spec

ATTENTION_IMPLEMENTATION = "sdpa"


class DeviceError(ValueError):
    """The asked device is malformed or not on this machine."""


def check_device_spec(spec: str) -> str:
    """`spec` lower-cased when it is one of auto, cpu, cuda, cuda:N, mps; else DeviceError."""
    try:
        return check_config_device_spec(spec)
    except ValueError as exc:
        raise DeviceError(str(exc)) from None


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch.device `spec` names on this machine ("auto" = CUDA, else MPS, else CPU); DeviceError if absent."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    normalised = check_device_spec(spec)
    if normalised == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if normalised == "cpu":
        return torch.device("cpu")
    if normalised == "mps":
        if not _mps_available():
            raise DeviceError(f"device mps: Apple MPS is not available here; use --device {_available()}")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {normalised}: no CUDA GPU is visible (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device {_available()}")
    device = torch.device(normalised)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {normalised}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def supports_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run at full speed: CUDA GPUs with bf16 support (Ampere+)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_dtype(device: torch.device) -> torch.dtype:
    """The autocast compute dtype for training on `device`: bf16 on GPUs that have it, else fp32."""
    return torch.bfloat16 if supports_bf16(device) else torch.float32


def inference_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype for eval and serving on `device`: bf16 on GPUs that have it, fp16 on other GPUs and MPS,
    fp32 on the CPU."""
    if supports_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type in {"cuda", "mps"} else torch.float32


def attention_kwargs() -> dict[str, str]:
    """from_pretrained keyword arguments that select SDPA attention (see `load_with_attention`)."""
    return {"attn_implementation": ATTENTION_IMPLEMENTATION}


def device_name(device: torch.device) -> str:
    """A human name for logs and reports: the GPU's model, or "cpu" / "mps"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _available() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return " or ".join(["auto", *found])
