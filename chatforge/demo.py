"""`make demo` / `chatforge demo`: the whole loop on the bundled sample — prepare, fine-tune, evaluate, serve.

Use it like this::

    project_file = write_demo_project(Path("demo-out"), fast=False, train_minutes=5.0)   # a chatforge.yaml
    outcomes = run_project(ProjectConfig.load(project_file), base_dir=project_file.parent)
    prepare(demo_inputs(), Path("demo-out/dataset"), PrepareConfig())                     # the data alone

The data is the English ChatterBot corpus (BSD licence), read from the installed `chatterbot-corpus` package and
never copied into this repo. The full demo fine-tunes the default base model (Gemma 3 270M) with LoRA; `fast`
trains a tiny random model from scratch instead (same path, a minute or two). The demo is an ordinary project
file run by `chatforge run`, so a second `make demo` skips the stages that are already done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FAST_MODEL_DIR = "tiny-model"


def demo_inputs(language: str = "english") -> list[Path]:
    """The folder of the corpus's YAML files for `language`; a clear error if the package is missing."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise ValueError("the demo data needs the 'chatterbot-corpus' package: pip install chatterbot-corpus") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        raise ValueError(f"chatterbot-corpus has no '{language}' folder at {folder}")
    return [folder]


def demo_settings(out: Path, fast: bool, train_minutes: float, max_steps: int) -> dict[str, Any]:
    """The demo's project file as a dict: relative paths under `out`, sized to the time budget."""
    from chatforge.models.source import DEFAULT_MODEL

    model = str((out / FAST_MODEL_DIR).resolve()) if fast else DEFAULT_MODEL
    return {
        "data": {"sources": [str(p) for p in demo_inputs()], "out": "dataset"},
        "prepare": {"fit": {"model": model, "max_tokens": 256}},
        "train": {
            "model": model, "out": "run", "method": "full" if fast else "lora",
            "lr": 3e-3 if fast else 2e-3, "schedule": "constant", "warmup_steps": 3,
            # packed rows: the sample's conversations are short (median ~30 tokens), so padding would waste most
            # of every step; 4 rows of 256 positions hold ~30 conversations
            "packing": True, "batch_size": 4, "max_length": 256, "max_steps": max_steps, "max_minutes": train_minutes,
            "eval_every": max(10, max_steps // 4), "save_every": max(10, max_steps // 4), "max_val_examples": 48,
            # LoRA on every linear layer at a high rate, plus trainable rows for the turn tokens (the base model
            # barely trained <end_of_turn>): what got the base model to end its turns within the budget (RESULTS.md)
            **({} if fast else {"lora": {"r": 16, "alpha": 32, "train_template_tokens": True, "target_modules": [
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}),
        },
        "eval": {"max_examples": 24 if fast else 40, "generation": {"max_new_tokens": 40, "batch_size": 8 if fast else 20},
                 "bias": {"max_new_tokens": 24}},
        "serve": {"db": f"sqlite:///{(out / 'chatforge.db').resolve()}", "port": 8000},
    }


def build_fast_model(out: Path) -> Path:
    """The tiny model of the fast demo: a BPE tokenizer trained on the corpus and a random 2-layer Llama."""
    from chatforge.models.tiny import build_tiny_llama, build_tiny_tokenizer

    model_dir = out / FAST_MODEL_DIR
    if (model_dir / "config.json").is_file():
        return model_dir
    corpus = "\n".join(p.read_text(encoding="utf-8") for folder in demo_inputs() for p in sorted(folder.glob("*.yml")))
    tokenizer_dir = build_tiny_tokenizer(out / "tiny-tokenizer", vocab_size=4096, extra_text=corpus)
    return build_tiny_llama(model_dir, tokenizer_dir, hidden=128, layers=2)


def plan_steps(out: Path, fast: bool, train_minutes: float, log: Any) -> int:
    """Optimizer steps that fit the time budget, from the train stage's own estimate of seconds per step."""
    from chatforge.config import ProjectConfig
    from chatforge.data.prepare import prepare
    from chatforge.train.loop import train

    probe_steps = 8
    settings = demo_settings(out, fast, train_minutes, probe_steps)
    project = ProjectConfig.model_validate(settings)
    dataset = out / "dataset"
    if not (dataset / "train.jsonl").is_file():
        prepare(demo_inputs(), dataset, project.prepare, log=log)
    probe = project.train.model_copy(update={"data": str(dataset), "out": str(out / "run-estimate")})
    estimate = train(probe, dry_run=True, log=lambda _m: None).estimate
    per_step = max(estimate["seconds"] / probe_steps, 1e-3)
    steps = max(10, int(train_minutes * 60 / per_step))
    log(f"estimate: ~{per_step:.2f} s per step of {settings['train']['batch_size']} packed rows -> {steps} steps "
        f"in the {train_minutes:g} min training budget (a hard stop at the budget guards the estimate)")
    return steps


def write_demo_project(out: Path, fast: bool, train_minutes: float, log: Any = print) -> Path:
    """Write out/chatforge.yaml for the demo (building the tiny model first when `fast`) and return its path.
    An existing one is kept (it may have been edited), so a second demo reruns nothing that is done."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "chatforge.yaml"
    if fast:
        build_fast_model(out)
    if path.is_file():
        log(f"using the existing project file {path} (delete it to size the demo afresh)")
        return path
    steps = plan_steps(out, fast, train_minutes, log)
    header = ("# Written by `chatforge demo`: the demo is an ordinary project; rerun it with\n"
              f"#   chatforge run {path}\n")
    path.write_text(header + yaml.safe_dump(demo_settings(out, fast, train_minutes, steps), sort_keys=False),
                    encoding="utf-8")
    return path
