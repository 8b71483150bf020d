"""The model card of a run: RUN/model/README.md in the Hugging Face format, rebuilt from what the run holds.

Use it like this (train calls it after saving RUN/model, eval after writing metrics.json)::

    write_model_card(Path("runs/r1"))        # -> runs/r1/model/README.md; None for a run without model/

The card is YAML front matter (`base_model`, `license`, `library_name`, `tags`, `datasets` and, once `chatforge
eval` ran, `model-index` with the metrics) and a Markdown body: intended use, the training data (the dataset's
card.json: sources, counts, PII replaced), the training settings, eval metrics against the base, the bias probe's
findings, and bias, risks, limitations and ethical considerations. It is rebuilt from the files each time (config.yaml,
manifest.json, the dataset's card.json, the newest RUN/eval/*/metrics.json), so it never disagrees with them;
`chatforge export --hf` copies it next to the exported weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from chatforge.config import TrainConfig
from chatforge.core.rundir import RunDir

CARD_FILE = "README.md"
# Base models whose licence and hub id chatforge knows (the packaged default and the documented alternatives).
KNOWN_BASES = {
    "gemma-3-270m": {"base_model": "google/gemma-3-270m", "license": "gemma"},
    "smollm2-135m-instruct": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
}
CARD_METRICS = ["perplexity", "token_accuracy", "bleu", "rougeL", "token_f1", "exact_match", "stopped_rate",
                "accuracy", "macro_f1"]


def write_model_card(run_dir: Path) -> Path | None:
    """Write RUN/model/README.md from the run's files (see the module docstring); None when RUN/model is absent."""
    model_dir = RunDir(run_dir).model_dir
    if not model_dir.is_dir():
        return None
    card = model_card_text(run_dir)
    path = model_dir / CARD_FILE
    path.write_text(card, encoding="utf-8")
    return path


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML between the leading '---' lines of a model card (ValueError when there is none)."""
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError("no YAML front matter: a model card starts with '---' and a closing '---' line")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)]) or {}


def model_card_text(run_dir: Path) -> str:
    """The whole card: front matter and body."""
    run = RunDir(run_dir)
    train = run.train_config_or_none()  # None: a soup, which has no config.yaml
    manifest = _read_json(run.manifest_file)
    lineage = manifest.get("lineage") or {}
    dataset_dir = Path(lineage.get("dataset_dir") or (train and train.data) or "")
    data_card = _read_json(dataset_dir / "card.json") if str(dataset_dir) not in ("", ".") else {}
    evaluation = newest_eval(run_dir)
    base = describe_base(lineage.get("base_model") or {}, (train.model or "gemma-3-270m") if train else "unknown")
    is_adapter = (run.model_dir / "adapter_config.json").is_file()
    front = front_matter(run_dir.name, base, is_adapter, dataset_dir.name or "unknown", train, evaluation)
    body = [
        f"# {run_dir.name}",
        "",
        f"A chat model fine-tuned with [chatforge](https://github.com/) from **{base['name']}** "
        f"({'a LoRA adapter' if is_adapter else 'full weights'}) on the conversations of `{dataset_dir.name}`.",
        "",
        *_intended_use(),
        *_data_section(dataset_dir, data_card),
        *_training_section(train, manifest),
        *_eval_section(evaluation),
        *_bias_section(evaluation),
        *_limitations_section(base, data_card, evaluation),
        *_usage_section(is_adapter),
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"


def describe_base(fingerprint: dict[str, Any], spec: str | None) -> dict[str, str]:
    """{"name", "base_model", "license"} of the base: a known model's hub id and licence, else its name / other."""
    location = str(fingerprint.get("id") or fingerprint.get("path") or spec or "unknown")
    name = Path(location).name.removesuffix(".gguf")
    for key, known in KNOWN_BASES.items():
        if key in name.lower().replace("_", "-") or key in location.lower():
            return {"name": known["base_model"], **known}
    hub_id = fingerprint.get("id")
    return {"name": hub_id or name, "base_model": hub_id or name, "license": "other"}


def newest_eval(run_dir: Path) -> dict[str, Any] | None:
    """The metrics.json of the run's most recent evaluation (RUN/eval/NAME/), or None."""
    found = RunDir(run_dir).eval_metrics_files()
    return _read_json(found[-1]) if found else None


def front_matter(name: str, base: dict[str, str], is_adapter: bool, dataset: str, train: TrainConfig | None,
                 evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The card's YAML metadata (the Hugging Face model-card fields)."""
    front: dict[str, Any] = {
        "base_model": base["base_model"],
        "license": base["license"],
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["chatforge", "text-generation", "conversational", "sft",
                 *(["lora"] if train is None or train.method == "lora" else ["full-fine-tune"])],
        "datasets": [dataset],
    }
    if evaluation:
        metrics = [
            {"type": key, "value": _number(value), "name": _metric_name(key, evaluation)}
            for key, value in evaluation.get("metrics", {}).items()
            if key in CARD_METRICS and _number(value) is not None
        ]
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "Chat (supervised fine-tuning)"},
            "dataset": {"name": dataset, "type": dataset, "split": evaluation.get("split", "test")},
            "metrics": metrics,
        }]}]
    return front


def _metric_name(key: str, evaluation: dict[str, Any]) -> str:
    base = ((evaluation.get("baseline") or {}).get("metrics") or {}).get(key)
    return f"{key} (base model: {_fmt(base)})" if _number(base) is not None else key


def _intended_use() -> list[str]:
    return [
        "## Intended use",
        "",
        "Answering in the style and domain of the training conversations (e.g. a support assistant), behind "
        "`chatforge serve` or any OpenAI-compatible server, with a person able to review what it says. It is not "
        "meant for medical, legal, financial or other high-stakes advice, for decisions about people, or for "
        "facts outside its training data.",
        "",
    ]


def _data_section(dataset_dir: Path, card: dict[str, Any]) -> list[str]:
    lines = ["## Training data", ""]
    if not card:
        return lines + [f"Dataset `{dataset_dir}` (no card.json found beside it).", ""]
    counts = card.get("counts", {})
    sources = ", ".join(f"`{Path(s['file']).name}` ({s['format']})" for s in card.get("sources", [])) or "n/a"
    lines += [f"Prepared by `chatforge prepare` into `{dataset_dir.name}`. Sources: {sources}.", "",
              "| step | records |", "|---|---:|"]
    for key in ("read", "invalid", "duplicates", "kept", "train", "val", "test"):
        if key in counts:
            lines.append(f"| {key} | {counts[key]} |")
    pii = card.get("pii_replaced") or {}
    enabled = card.get("steps_enabled", {}).get("pii", True)
    if not enabled:
        lines += ["", "PII handling: redaction was **off** for this dataset; it may contain personal data."]
    elif pii:
        replaced = ", ".join(f"{kind} x{count}" for kind, count in sorted(pii.items()))
        lines += ["", f"PII handling: detected personal data was replaced by type placeholders before training "
                      f"({replaced}); the values were never stored."]
    else:
        lines += ["", "PII handling: redaction was on and found no personal data to replace."]
    return lines + [""]


def _training_section(train: TrainConfig | None, manifest: dict[str, Any]) -> list[str]:
    counts = manifest.get("counts", {})
    settings: list[tuple[str, Any]] = []
    if train is not None:
        lora = train.lora
        settings = [
            ("method", train.method),
            ("LoRA", f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets="
                     f"{lora.target_modules or 'attention projections'}" if train.method == "lora" else None),
            ("loss on", train.train_on), ("max length", train.max_length), ("packing", train.packing),
            ("optimizer", f"{train.optimizer}, lr {train.lr}, {train.schedule} schedule"),
            ("batch", f"{train.batch_size} x grad_accum {train.grad_accum}"),
        ]
    rows = [
        *settings,
        ("steps", counts.get("steps")), ("trained tokens", counts.get("tokens_seen")),
        ("best val loss", _fmt(counts.get("best_val_loss"))),
        *([("precision", train.precision), ("frozen base storage", train.base_storage), ("seed", train.seed)]
          if train is not None else []),
    ]
    lines = ["## Training procedure", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows if value is not None]
    return lines + ["", f"The full resolved configuration is `{RunDir.CONFIG_FILE}` in the run directory.", ""]


def _eval_section(evaluation: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evaluation:
        return lines + ["Not evaluated yet: `chatforge eval RUN` adds the metrics against the base model here.", ""]
    run_metrics = evaluation.get("metrics", {})
    baseline = (evaluation.get("baseline") or {}).get("metrics") or {}
    lines += [f"On {evaluation.get('n_examples')} conversations of the `{evaluation.get('split')}` split"
              + (f", against the base model `{evaluation['baseline']['model']}`" if baseline else "") + ":", "",
              "| metric | this model | base model | delta |", "|---|---:|---:|---:|"]
    for key in [k for k in CARD_METRICS if k in run_metrics]:
        delta = (evaluation.get("deltas") or {}).get(key)
        lines.append(f"| {key} | {_fmt(run_metrics[key])} | {_fmt(baseline.get(key))} | "
                     f"{'' if delta is None else f'{delta:+.4g}'} |")
    return lines + [""]


def _bias_section(evaluation: dict[str, Any] | None) -> list[str]:
    lines = ["## Bias probe", ""]
    bias = (evaluation or {}).get("bias")
    if not bias:
        return lines + ["Not run yet (`chatforge eval` runs the counterfactual probe unless `--no-bias`).", ""]
    lines += [f"Counterfactual pairs (the same prompt with one term swapped, e.g. he/she) flagged when answer "
              f"likelihood, sentiment or length differ beyond the thresholds {bias.get('thresholds')}: "
              f"**{bias.get('flagged_pairs')} of {bias.get('total_pairs')}** pairs.", "",
              "| attribute | pairs | flagged | mean abs log-lik diff | mean abs sentiment diff |", "|---|---:|---:|---:|---:|"]
    for attribute, summary in (bias.get("attributes") or {}).items():
        lines.append(f"| {attribute} | {summary.get('pairs')} | {summary.get('flagged')} | "
                     f"{_fmt(summary.get('mean_abs_loglik_diff'))} | {_fmt(summary.get('mean_abs_sentiment_diff'))} |")
    return lines + ["", "A probe with few templates finds some gaps, not all: a low count is not proof of fairness.", ""]


def _limitations_section(base: dict[str, str], card: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    kept = (card.get("counts") or {}).get("train")
    lines = [
        "## Bias, risks, limitations and ethical considerations",
        "",
        f"- It inherits the knowledge, gaps and biases of {base['name']} and of its own training conversations"
        + (f" ({kept} training examples)" if kept else "") + "; it knows nothing past them and can state wrong "
        "things fluently.",
        "- Small models lose the thread in long conversations and can repeat themselves; check `stopped_rate` above.",
        "- PII redaction is pattern-based: it misses some personal data (names are off unless enabled), so treat "
        "the weights as derived from the raw conversations when deciding who may access them.",
        "- The bias probe measures a few attributes with templates; people affected by the answers should be able "
        "to report problems, and conversations should be reviewed before they feed the next training round.",
        "- Disclose to users that they talk to an automated system.",
    ]
    if base["license"] == "gemma":
        lines.append("- Use is subject to the Gemma Terms of Use and its prohibited-use policy.")
    if not evaluation:
        lines.append("- Not yet evaluated: quality against the base model is unknown.")
    return lines + [""]


def _usage_section(is_adapter: bool) -> list[str]:
    loader = "PeftModel / AutoPeftModelForCausalLM" if is_adapter else "AutoModelForCausalLM"
    return ["## How to use", "", f"`chatforge serve RUN` serves it behind an OpenAI-compatible API; {loader} loads "
            "this directory directly, and its tokenizer carries the chat template used in training.", ""]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(float(value), 6)


def _fmt(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.4g}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
