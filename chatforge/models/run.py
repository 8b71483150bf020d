"""Load what training produced (a run, an ensemble of runs) or a base model for a baseline: the one way eval and
serve get a model.

Use it like this::

    loaded = load_run("runs/r1")          # RUN/model: a LoRA adapter (merged on load) or a full model
    loaded = load_run("runs/ens")         # RUN/ensemble.json: the members' next-token probabilities averaged
    loaded = load_run("gemma3-270m")      # a base model (HF dir, hub id, .gguf), given a chat template if it lacks one
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    logits, cache = forward_step(loaded.model, ids)                 # any kind; cache=None at first
    next_id = logits[:, -1].argmax(-1)                               # stop once it is in loaded.stop_token_ids
    logits, cache = forward_step(loaded.model, next_id[:, None], cache)   # only the new token

Every kind answers the same forward call (`forward_step` also hides transformers' rename of `past_key_values` to
`cache`), so a decoding loop written once serves them all. An ensemble's `logits` are log-probabilities (log of
the weighted mean of the members' softmaxes): argmax, softmax and sampling over them act on the averaged
distribution. `model.generate` works for every kind but the ensemble.

Adapters are merged into their base on load (`merge_adapter=True`): decoding then costs what the base model costs,
and every kind but the ensemble is a plain transformers model. Pass `merge_adapter=False` to keep the peft wrapper
(to inspect or swap the adapter); the two differ by float rounding only.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from chatforge.core.rundir import RunDir
from chatforge.device import attention_kwargs, inference_dtype, resolve_device
from chatforge.models.source import load_tokenizer, model_dir
from chatforge.models.templates import end_of_turn_token, ensure_chat_template

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoadedRun:
    """A model ready for inference (eval mode, on its device), its tokenizer and the ids decoding stops on."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "adapter" | "full" | "ensemble" | "base"
    run_dir: Path | None  # None for a base model (or a bare adapter dir outside a run)
    stop_token_ids: list[int]


@dataclass(frozen=True)
class RunFiles:
    """Where a run's pieces lie: what `load_run` and `chatforge ensemble` read.

    `find_run("runs/r1")` and `find_run("runs/r1/model")` both give kind "adapter" or "full", run_dir runs/r1 and
    weights_dir runs/r1/model; for an ensemble weights_dir is the run dir (ensemble.json) and the tokenizer sits
    in RUN/tokenizer.
    """

    kind: str  # "adapter" | "full" | "ensemble"
    run_dir: Path | None
    weights_dir: Path
    tokenizer_dir: Path


def find_run(path: Path | str) -> RunFiles | None:
    """The run at `path` (a run dir, its model/ dir, an ensemble dir or a bare peft adapter dir); None if no run."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return None
    run = RunDir(directory)
    if run.is_ensemble():
        return RunFiles("ensemble", directory, directory, run.ensemble_tokenizer_dir)
    if run.has_model():
        return _run_files(directory, run.model_dir)
    if _is_run_model_dir(directory):
        return _run_files(directory.parent, directory)
    if (directory / ADAPTER_CONFIG).is_file():  # an adapter saved outside chatforge
        return _run_files(None, directory)
    return None


def _run_files(run_dir: Path | None, weights_dir: Path) -> RunFiles:
    kind = "adapter" if (weights_dir / ADAPTER_CONFIG).is_file() else "full"
    return RunFiles(kind, run_dir, weights_dir, weights_dir)


def _is_run_model_dir(directory: Path) -> bool:
    """True for RUN/model given directly: its parent's manifest names it as the run's model."""
    manifest_path = RunDir(directory.parent).manifest_file
    if not manifest_path.is_file():
        return False
    try:
        outputs = json.loads(manifest_path.read_text(encoding="utf-8")).get("outputs", {})
    except json.JSONDecodeError:
        return False
    return outputs.get("model") == directory.name


def load_run(
    path: Path | str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "auto",
    merge_adapter: bool = True,
) -> LoadedRun:
    """Load a run, an ensemble or a base model (see the module docstring); the model is in eval mode on `device`
    ("auto", "cpu", "cuda:N", ... as chatforge.device resolves it) in `dtype` (None = the device's inference dtype:
    bf16 on GPUs that have it, fp32 on the CPU).

    Raises FileNotFoundError for a path that is neither a run nor a model, or a run whose base or members are
    gone, and ValueError for a spec that names no model.
    """
    device = resolve_device(device)
    dtype = dtype or inference_dtype(device)
    files = find_run(path)
    if files is None:
        model, tokenizer = _load_base(path, dtype)
        kind, run_dir = "base", None
    elif files.kind == "ensemble":
        model, tokenizer = _load_ensemble(files, dtype, device, merge_adapter)
        kind, run_dir = "ensemble", files.run_dir
    else:
        tokenizer = load_run_tokenizer(files)
        if files.kind == "adapter":
            model = _load_adapter(files.weights_dir, tokenizer, dtype, merge_adapter)
        else:
            model = _load_causal_lm(files.weights_dir, dtype)
        kind, run_dir = files.kind, files.run_dir
    model.to(device)
    model.eval()
    return LoadedRun(model, tokenizer, kind, run_dir, stop_token_ids(tokenizer))


def load_run_tokenizer(files: RunFiles) -> PreTrainedTokenizerBase:
    """The tokenizer a run was trained with, chat template included (RUN/model, or RUN/tokenizer of an ensemble)."""
    if not (files.tokenizer_dir / "tokenizer_config.json").is_file():
        if files.kind == "adapter":  # an adapter saved without its tokenizer: the base's
            return load_tokenizer(adapter_base(files.weights_dir))
        raise FileNotFoundError(f"{files.tokenizer_dir}: no tokenizer saved; is this a finished chatforge run?")
    tokenizer = AutoTokenizer.from_pretrained(files.tokenizer_dir)
    template_file = RunDir(files.run_dir).template_file if files.run_dir else None
    if not tokenizer.chat_template and template_file is not None and template_file.is_file():
        tokenizer.chat_template = template_file.read_text(encoding="utf-8")
    ensure_chat_template(tokenizer)
    return tokenizer


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the template's end-of-turn token and of eos, in that order, without repeats or unknowns."""
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for token in (end_of_turn_token(tokenizer), tokenizer.eos_token):
        if token is not None and token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (adapter_config.json `base_model_name_or_path`), checked to exist."""
    config_path = adapter_dir / ADAPTER_CONFIG
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path}: no base_model_name_or_path; set it to the base model's directory")
    if Path(base).is_absolute() and not Path(base).exists():
        raise FileNotFoundError(
            f"{config_path}: base model {base} does not exist; restore it or point base_model_name_or_path at a copy"
        )
    return str(base)


def _load_causal_lm(location: Path | str, dtype: torch.dtype) -> nn.Module:
    model = load_causal_lm(location, dtype)
    model.config.use_cache = True  # training saves use_cache=False; decoding wants the KV cache
    return model


def load_causal_lm(location: Path | str, dtype: torch.dtype) -> nn.Module:
    """AutoModelForCausalLM from an HF directory or hub id in `dtype`, with SDPA attention where the architecture
    has it (the one loader of train, eval and serve)."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype, **attention_kwargs())
    except ValueError as exc:  # an architecture without SDPA: its default attention
        if "attn_implementation" not in str(exc) and "sdpa" not in str(exc).lower():
            raise
        return AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype)


def _fit_embeddings(model: nn.Module, tokenizer: Any) -> None:
    """Grow the embeddings to the tokenizer when chat-template tokens were added to it (as training does)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def _load_adapter(adapter_dir: Path, tokenizer: Any, dtype: torch.dtype, merge: bool) -> nn.Module:
    from peft import PeftModel  # lazy: peft is the train extra; serving a full or merged model runs without it

    base = _load_causal_lm(model_dir(adapter_base(adapter_dir)), dtype)
    _fit_embeddings(base, tokenizer)
    model = PeftModel.from_pretrained(base, adapter_dir)
    return model.merge_and_unload() if merge else model


def _load_base(path: Path | str, dtype: torch.dtype) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    directory = Path(path).expanduser()
    if directory.is_dir() and not (directory / "config.json").is_file() and not any(directory.glob("*.gguf")):
        raise FileNotFoundError(
            f"{directory}: not a finished chatforge run (no {RunDir.MODEL_DIR}/ or {RunDir.ENSEMBLE_FILE}) "
            "nor a model directory (no config.json or .gguf)"
        )
    spec = str(path)
    tokenizer = load_tokenizer(spec)
    model = _load_causal_lm(model_dir(spec), dtype)
    _fit_embeddings(model, tokenizer)
    return model, tokenizer


def _load_ensemble(
    files: RunFiles, dtype: torch.dtype, device: str | torch.device, merge_adapter: bool
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    assert files.run_dir is not None
    spec = RunDir(files.run_dir).ensemble_spec()
    members = [load_run(m["run"], dtype, device, merge_adapter).model for m in spec["members"]]
    weights = [float(m["weight"]) for m in spec["members"]]
    return EnsembleModel(members, weights), load_run_tokenizer(files)


def forward_step(
    model: nn.Module, input_ids: Tensor, cache: Any = None, attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None, use_cache: bool = True, logits_to_keep: int = 0,
) -> tuple[Tensor, Any]:
    """Run any `LoadedRun.model` on `input_ids` after `cache` (None at first); return (logits, the extended cache).

    transformers renamed the cache argument and output from `past_key_values` to `cache`; this passes and reads
    whichever the model has, so one decoding loop serves every kind of run on every supported version.
    """
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": use_cache,
                              _cache_keyword(model): cache}
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(input_ids=input_ids, **kwargs)
    if not use_cache:
        return out.logits, None
    new_cache = getattr(out, "cache", None)
    return out.logits, new_cache if new_cache is not None else getattr(out, "past_key_values", None)


def _cache_keyword(model: nn.Module) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes it on
    return _cache_keyword_of(type(inner))


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class EnsembleModel(nn.Module):
    """Several causal LMs that share a tokenizer, answering as one: the weighted mean of their next-token
    distributions, returned as log-probabilities.

    Use it like a transformers model in a decoding loop (or through `forward_step`)::

        out = ensemble(ids, use_cache=True)                       # out.logits: log(sum_i w_i softmax(logits_i))
        out = ensemble(new_ids, cache=out.cache, use_cache=True)  # only the new tokens

    The cache is a tuple of the members' caches, in member order; pass it back unchanged. `cache` and
    `past_key_values` name the same argument and output (transformers' new and old names).
    """

    def __init__(self, members: list[nn.Module], weights: list[float]) -> None:
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError(f"{len(members)} members but {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"ensemble weights must be positive, got {weights}")
        total = sum(weights)
        self.members = nn.ModuleList(members)
        self.weights = [w / total for w in weights]
        self.register_buffer("log_weights", torch.tensor(self.weights, dtype=torch.float32).log(), persistent=False)
        self.config = getattr(members[0], "config", None)  # context length, special ids: the first member's

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: tuple[Any, ...] | None = None,
        use_cache: bool = False,
        cache: tuple[Any, ...] | None = None,
        logits_to_keep: int = 0,
    ) -> SimpleNamespace:
        """Return SimpleNamespace(logits=[batch, positions, vocab] log-probs, cache=past_key_values=tuple or None)."""
        caches_in = cache if cache is not None else past_key_values
        if caches_in is not None and len(caches_in) != len(self.members):
            raise ValueError(f"the cache holds {len(caches_in)} member caches; this ensemble has {len(self.members)}")
        mixed: Tensor | None = None
        truncated = False
        caches_out = []
        for index, member in enumerate(self.members):
            logits, member_cache = forward_step(
                member, input_ids, None if caches_in is None else caches_in[index], attention_mask, position_ids,
                use_cache, logits_to_keep,
            )
            caches_out.append(member_cache)
            logits = logits.float()
            if mixed is not None and logits.shape[-1] != mixed.shape[-1]:  # padded embedding rows: no real token
                width = min(logits.shape[-1], mixed.shape[-1])
                logits, mixed, truncated = logits[..., :width], mixed[..., :width], True
            weighted = torch.log_softmax(logits, dim=-1) + self.log_weights[index]
            mixed = weighted if mixed is None else torch.logaddexp(mixed, weighted)  # one vocab-sized buffer, not N
        if truncated:
            mixed = torch.log_softmax(mixed, dim=-1)
        caches = tuple(caches_out) if use_cache else None
        return SimpleNamespace(logits=mixed, cache=caches, past_key_values=caches)
