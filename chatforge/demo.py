"""`make demo` / `chatforge demo`: the whole loop on the bundled sample — prepare, fine-tune, evaluate, serve.

Use it like this::

    project_file = write_demo_project(Path("demo-out"), fast=False, train_minutes=10.0)   # a chatforge.yaml
    outcomes = run_project(ProjectConfig.load(project_file), base_dir=project_file.parent)
    prepare(demo_inputs(), Path("demo-out/dataset"), PrepareConfig())                      # the data alone

The data: a support FAQ for the Lumo desk lamp, a fictional product written for this project
(chatforge/resources/lumo_faq.jsonl, made by make_lumo_faq.py: each question in five phrasings, split so that the
test set asks trained questions in unseen words), then the small files of the English ChatterBot corpus (BSD
licence, read from the installed `chatterbot-corpus` package, never copied here). The full demo fine-tunes
SmolLM2-135M-Instruct (an instruct model: the demo shows adaptation to your data, not a base model learning to chat)
with LoRA for the recipe's `DEMO_STEPS` steps; the time budget only guards them, and when it cuts training short
the demo says so. `fast` trains a tiny random model from scratch instead (same path, a minute or two). The demo is
an ordinary project file run by `chatforge run`, so a second `make demo` skips the stages that are already done.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from chatforge.config import ProjectConfig
from chatforge.models.source import SMOLLM2_MODEL

FAST_MODEL_DIR = "tiny-model"
FAQ_FILE = Path(__file__).parent / "resources" / "lumo_faq.jsonl"
# The ChatterBot files the demo uses: everyday small talk, so the run keeps chatting. The rest of the corpus (coding,
# tech_support and trivia are two thirds of it, with many duplicates) would multiply the training time without
# changing what the demo shows.
CHATTERBOT_FILES = ("botprofile", "conversations", "emotion", "greetings", "humor")
DEMO_STEPS = 40  # the recipe: ~2 epochs of the demo data (~18k tokens) in 4 packed rows of 256 tokens per step
FAST_STEPS = 40


def demo_inputs(language: str = "english") -> list[Path]:
    """The demo's sources: the Lumo FAQ first (so eval's first test items are FAQ questions), then the ChatterBot
    files of CHATTERBOT_FILES; a clear error if the corpus package is missing."""
    try:  # here, not at the top: a clear message when a slim install left the corpus package out
        import chatterbot_corpus
    except ImportError:
        raise ValueError("the demo data needs the 'chatterbot-corpus' package: pip install chatterbot-corpus") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        raise ValueError(f"chatterbot-corpus has no '{language}' folder at {folder}")
    return [FAQ_FILE, *(folder / f"{name}.yml" for name in CHATTERBOT_FILES if (folder / f"{name}.yml").is_file())]


def demo_settings(out: Path, fast: bool, train_minutes: float, max_steps: int) -> dict[str, Any]:
    """The demo's project file as a dict: relative paths under `out`, `max_steps` steps guarded by the time budget."""
    model = str((out / FAST_MODEL_DIR).resolve()) if fast else SMOLLM2_MODEL
    return {
        "data": {"sources": [str(p) for p in demo_inputs()], "out": "dataset"},
        "prepare": {"fit": {"model": model, "max_tokens": 256}},
        "train": {
            "model": model, "out": "run", "method": "full" if fast else "lora",
            "lr": 3e-3 if fast else 2e-3, "schedule": "cosine", "warmup_steps": 3,
            # on a machine already busier than its cores, one thread each beats threads fighting for the cores
            "threads": 1 if busy_machine() else None,
            # packed rows: the sample's conversations are short (median ~50 tokens with SmolLM2's system prompt),
            # so padding would waste most of every step; 4 rows of 256 positions hold ~20 conversations
            "packing": True, "batch_size": 4, "max_length": 256, "max_steps": max_steps, "max_minutes": train_minutes,
            "eval_every": max(10, max_steps // 4), "save_every": max(10, max_steps // 4), "max_val_examples": 48,
            "log_every": 5,
            # a 135M model needs ~2.5 GB either way: the demo keeps fp32 weights and no recomputation (the memory
            # savers' defaults) for speed on a slow CPU, as its recorded runs in RESULTS.md were made
            "base_storage": "fp32", "gradient_checkpointing": False,
            # LoRA on every linear layer of the top 10 of SmolLM2's 30 layers: the backward pass stops there, which
            # halves the step time on a CPU, and it still learns the FAQ's facts in the recipe's steps (RESULTS.md)
            **({} if fast else {"lora": {"r": 16, "alpha": 32, "last_layers": 10, "target_modules": [
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}),
        },
        "eval": {"max_examples": 24 if fast else 32, "generation": {"max_new_tokens": 48, "batch_size": 8 if fast else 20},
                 "bias": {"max_new_tokens": 24}},
        # the tiny fast model is served by the torch engine; the real one by llama.cpp when it is built (auto)
        "serve": {"db": f"sqlite:///{(out / 'chatforge.db').resolve()}", "port": 8000,
                  "backend": "torch" if fast else "auto"},
    }


def busy_machine() -> bool:
    """True when the last minute's load average already fills every core (other work is running)."""
    return os.getloadavg()[0] >= (os.cpu_count() or 1)


def build_fast_model(out: Path) -> Path:
    """The tiny model of the fast demo: a BPE tokenizer trained on the corpus and a random 2-layer Llama."""
    from chatforge.models.tiny import build_tiny_llama, build_tiny_tokenizer  # lazy: transformers, see plan_steps

    model_dir = out / FAST_MODEL_DIR
    if (model_dir / "config.json").is_file():
        return model_dir
    corpus = "\n".join(p.read_text(encoding="utf-8") for p in demo_inputs())
    tokenizer_dir = build_tiny_tokenizer(out / "tiny-tokenizer", vocab_size=4096, extra_text=corpus)
    return build_tiny_llama(model_dir, tokenizer_dir, hidden=128, layers=2)


def plan_steps(out: Path, fast: bool, train_minutes: float, log: Any) -> int:
    """The recipe's steps (DEMO_STEPS), and a warning when the train stage's own estimate says the time budget will
    not hold them: training is planned by steps, the budget only guards against a machine far slower than expected."""
    # lazy: the stages pull in torch, transformers, accelerate and peft (30 s vs 0.9 s measured for chatforge.pipeline
    # on the loaded dev machine); demo_settings and demo_inputs, which tests and `--help` use, need none of them
    from chatforge.data.prepare import prepare
    from chatforge.train.loop import train

    steps = FAST_STEPS if fast else DEMO_STEPS
    settings = demo_settings(out, fast, train_minutes, steps)
    project = ProjectConfig.model_validate(settings)
    dataset = out / "dataset"
    if not (dataset / "train.jsonl").is_file():
        prepare(demo_inputs(), dataset, project.prepare, log=log)
    probe = project.train.model_copy(update={"data": str(dataset), "out": str(out / "run-estimate")})
    estimate = train(probe, dry_run=True, log=lambda _m: None).estimate
    minutes = estimate["seconds"] / 60
    log(f"plan: {steps} steps of {settings['train']['batch_size']} packed rows; estimated {minutes:.1f} min of "
        f"training, {train_minutes:g} min budget")
    if minutes > train_minutes:
        log(f"WARNING: the estimate ({minutes:.1f} min) exceeds the {train_minutes:g} min budget: training will stop "
            f"early and the result will be weaker; pass --minutes {math.ceil(minutes * 1.5)} for the full recipe")
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
