"""`chatforge eval`: score a run on its dataset's test split against a baseline, and write the report.

Use it like this::

    report = evaluate_run("runs/r1", EvalConfig(max_examples=100))     # baseline: the run's base model
    report.eval_dir            # runs/r1/eval/test/: metrics.json, predictions.jsonl, report.md, report.html, manifest.json
    report.metrics["metrics"]["rougeL"], report.metrics["deltas"]["rougeL"]

For every test conversation the last assistant turn is the reference and the turns before it are the prompt.
Perplexity and token accuracy are over the assistant tokens the run trained on (its own `train_on` and
`max_length`, read from RUN/config.yaml). Answers are generated in batches with the run's saved chat template and
stop tokens; the baseline (the run's base model unless `baseline` names another run or model, `none` for none) is
prompted with the same template, so "does it answer in the format and stop by itself" is a fair question to both.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chatforge.config import EvalConfig, GenerationConfig, TrainConfig
from chatforge.core.examples import tokenize_records
from chatforge.core.records import read_jsonl, write_jsonl
from chatforge.core.rundir import RunDir
from chatforge.evaluate.bias import probe_bias
from chatforge.evaluate.labels import label_metrics
from chatforge.evaluate.likelihood import masked_likelihood
from chatforge.evaluate.metrics import text_scores
from chatforge.evaluate.report import write_reports
from chatforge.manifest import Manifest
from chatforge.models.generate import SamplingSettings, chat_prompt_ids, generate_batch
from chatforge.models.model_card import write_model_card
from chatforge.models.run import LoadedRun, adapter_base, find_run, load_run, stop_token_ids
from chatforge.models.source import DEFAULT_MODEL

Log = Callable[[str], None]
LOWER_IS_BETTER = {"loss", "perplexity"}


class EvalError(ValueError):
    """A user-facing problem with what was asked to evaluate (not a run, no test split, ...)."""


@dataclass
class EvalReport:
    eval_dir: Path
    metrics: dict[str, Any]  # the content of metrics.json
    report_html: Path | None


@dataclass
class EvalItem:
    """One test conversation split into what the model sees and what it should say."""

    id: str
    prompt: list[dict[str, str]]
    reference: str
    label: str | None
    record: dict[str, Any]


def evaluate_run(run: Path | str, cfg: EvalConfig | None = None, log: Log = print) -> EvalReport:
    """Run the eval stage (see the module docstring); writes RUN/eval/NAME/."""
    cfg = cfg or EvalConfig()
    files = find_run(run)
    if files is None or files.run_dir is None:
        raise EvalError(f"{run}: not a chatforge run directory (no {RunDir.MODEL_DIR}/ or {RunDir.ENSEMBLE_FILE})")
    run_dir = files.run_dir
    run_files = RunDir(run_dir)
    train_cfg = run_train_config(run_files)
    data_dir = Path(cfg.data or train_cfg.data or "")
    split_path = data_dir / f"{cfg.split}.jsonl"
    if not split_path.is_file():
        raise EvalError(f"{split_path}: missing; pass --data DATASET_DIR (a `chatforge prepare` output with a {cfg.split} split)")
    records = list(read_jsonl(split_path))[: cfg.max_examples]
    items, skipped = eval_items(records)
    if not items:
        raise EvalError(f"{split_path}: no conversation ends with an assistant turn to compare against")
    eval_dir = run_files.eval_dir(cfg.name or cfg.split)
    eval_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.start("eval", config=cfg.model_dump(mode="json"))
    manifest.add_input(split_path)
    if run_files.manifest_file.is_file():
        manifest.add_input(run_files.manifest_file, role="run")

    with manifest.timed("load"):
        loaded = load_run(run_dir, device=cfg.device)
    log(f"evaluating {run_dir} ({loaded.kind}) on {len(items)} {cfg.split} conversations of {data_dir}")
    run_side = score_model(loaded, items, cfg, train_cfg, manifest, "run", log)
    bias = None
    if cfg.bias.enabled:
        with manifest.timed("bias"):
            bias = probe_bias(loaded, cfg.bias)
        log(f"bias probe: {bias['flagged_pairs']} of {bias['total_pairs']} pairs flagged")
    run_template = loaded.tokenizer.chat_template
    run_tokenizer = loaded.tokenizer
    del loaded
    gc.collect()

    baseline_spec = cfg.baseline or base_model_of(run_dir, train_cfg)
    base_side: dict[str, Any] | None = None
    bias_baseline: dict[str, Any] | None = None
    baseline_info: dict[str, Any] | None = None
    if baseline_spec and baseline_spec.lower() != "none":
        with manifest.timed("baseline_load"):
            baseline = load_baseline(baseline_spec, run_tokenizer, run_template, cfg.device)
        log(f"baseline {baseline_spec} ({baseline.kind})")
        base_side = score_model(baseline, items, cfg, train_cfg, manifest, "baseline", log)
        baseline_info = {"model": str(baseline_spec), "kind": baseline.kind, "metrics": base_side["metrics"]}
        if cfg.bias.enabled:  # the base's own flags, so a user sees which ones fine-tuning introduced
            with manifest.timed("bias_baseline"):
                bias_baseline = probe_bias(baseline, cfg.bias)
            log(f"bias probe of the base: {bias_baseline['flagged_pairs']} of {bias_baseline['total_pairs']} pairs flagged")
        del baseline
        gc.collect()

    metrics = {
        "name": eval_dir.name, "run": str(run_dir.resolve()), "run_kind": files.kind, "data": str(data_dir.resolve()),
        "split": cfg.split, "n_examples": len(items), "skipped_no_assistant_turn": skipped,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "metrics": run_side["metrics"],
        "baseline": baseline_info,
        "deltas": deltas(run_side["metrics"], base_side["metrics"]) if base_side else {},
        "bias": bias,
        "bias_baseline": bias_baseline,
        "generation": run_side["generation"],
        "timings": dict(manifest.timings_s),
    }
    predictions = prediction_rows(items, run_side, base_side)
    write_jsonl(eval_dir / "predictions.jsonl", predictions)
    (eval_dir / RunDir.EVAL_METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=True), encoding="utf-8")
    write_model_card(run_dir)  # RUN/model/README.md now carries these metrics and the bias probe
    _, html_path = write_reports(eval_dir, run_dir)
    manifest.counts.update({"evaluated": len(items), "skipped_no_assistant_turn": skipped})
    manifest.outputs.update({name: name for name in (RunDir.EVAL_METRICS_FILE, "predictions.jsonl", "report.md",
                                                     "report.html")})
    manifest.write(eval_dir)
    return EvalReport(eval_dir, metrics, html_path)


def eval_items(records: list[dict[str, Any]]) -> tuple[list[EvalItem], int]:
    """Conversations that end in an assistant turn, cut into prompt + reference; and how many did not."""
    items, skipped = [], 0
    for number, record in enumerate(records):
        messages = record.get("messages", [])
        last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last_assistant is None or last_assistant == 0:
            skipped += 1
            continue
        meta = record.get("meta") or {}
        label = meta.get("label", meta.get("category"))
        items.append(EvalItem(str(record.get("id", meta.get("id", number))), messages[:last_assistant],
                              messages[last_assistant]["content"], None if label is None else str(label),
                              {**record, "messages": messages[: last_assistant + 1]}))
    return items, skipped


def score_model(
    loaded: LoadedRun, items: list[EvalItem], cfg: EvalConfig, train_cfg: TrainConfig, manifest: Manifest,
    side: str, log: Log,
) -> dict[str, Any]:
    """Likelihood, generation and text scores of one model on the items."""
    with manifest.timed(f"{side}_likelihood"):
        examples = tokenize_records([i.record for i in items], loaded.tokenizer, train_cfg.train_on,
                                    train_cfg.max_length)
        likelihood = masked_likelihood(loaded, examples, cfg.batch_size)
    gen = cfg.generation
    settings = SamplingSettings(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                seed=gen.seed, **penalty_settings(gen))
    prompts = [chat_prompt_ids(loaded.tokenizer, item.prompt) for item in items]
    started = time.perf_counter()
    with manifest.timed(f"{side}_generation"):
        answers = generate_batch(loaded, prompts, [_seeded(settings, n) for n in range(len(items))], gen.batch_size)
    seconds = time.perf_counter() - started
    generated = sum(len(a.token_ids) for a in answers)
    log(f"{side}: loss {likelihood.loss:.3f}, {generated} tokens generated in {seconds:.1f} s")
    texts = [a.text.strip() for a in answers]
    scores = text_scores(texts, [item.reference for item in items])
    metrics: dict[str, float] = {
        "loss": likelihood.loss, "perplexity": likelihood.perplexity, "token_accuracy": likelihood.token_accuracy,
        **scores.corpus,
        "stopped_rate": sum(a.finish_reason == "stop" for a in answers) / len(answers),
        "mean_answer_tokens": generated / len(answers),
    }
    metrics.update(label_metrics([item.label for item in items], texts, [item.reference for item in items],
                                 cfg.label_max_classes))
    return {
        "metrics": metrics, "answers": answers, "texts": texts, "per_sample": scores.per_sample,
        "generation": {**gen.model_dump(), "generated_tokens": generated, "seconds": round(seconds, 3),
                       "tokens_per_s": generated / seconds if seconds else 0.0},
    }


def _seeded(settings: SamplingSettings, index: int) -> SamplingSettings:
    """Per-prompt seeds (seed + index): sampled answers repeat run after run, whatever the batching."""
    if settings.temperature <= 0 or settings.seed is None:
        return settings
    return dataclasses.replace(settings, seed=settings.seed + index)


def penalty_settings(gen: GenerationConfig) -> dict[str, float]:
    """The OpenAI-style penalties of `gen` that differ from "off", as SamplingSettings keyword arguments.

    Only those are passed, so eval runs with a decoder that has no penalty fields as long as none is asked for."""
    wanted = {"frequency_penalty": gen.frequency_penalty, "presence_penalty": gen.presence_penalty,
              "repetition_penalty": gen.repetition_penalty}
    off = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}
    supported = {f.name for f in dataclasses.fields(SamplingSettings)}
    asked = {name: value for name, value in wanted.items() if value != off[name]}
    missing = sorted(set(asked) - supported)
    if missing:
        raise EvalError(f"eval.generation.{missing[0]}: this chatforge's decoder has no such setting; leave it at "
                        f"{off[missing[0]]}")
    return asked


def prediction_rows(items: list[EvalItem], run_side: dict[str, Any], base_side: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for n, item in enumerate(items):
        answer = run_side["answers"][n]
        row = {"id": item.id, "prompt": item.prompt, "reference": item.reference, "answer": run_side["texts"][n],
               "finish_reason": answer.finish_reason, "answer_tokens": len(answer.token_ids),
               "scores": run_side["per_sample"][n], "label": item.label,
               "baseline_answer": None, "baseline_finish_reason": None, "baseline_scores": None}
        if base_side is not None:
            row.update(baseline_answer=base_side["texts"][n], baseline_finish_reason=base_side["answers"][n].finish_reason,
                       baseline_scores=base_side["per_sample"][n])
        rows.append(row)
    return rows


def deltas(run: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """run minus baseline for every metric both have."""
    return {key: run[key] - baseline[key] for key in run if key in baseline}


def run_train_config(run: RunDir) -> TrainConfig:
    """The settings RUN was trained with (an ensemble: its first member's); TrainConfig's defaults for a run that
    has no config.yaml (a weight-averaged soup). An invalid config.yaml is an EvalError naming the file."""
    try:
        return run.train_config_or_none() or TrainConfig()
    except (ValueError, FileNotFoundError) as exc:  # RunDirError, or an ensemble whose members are gone
        raise EvalError(str(exc)) from exc


def base_model_of(run_dir: Path, train_cfg: TrainConfig) -> str | None:
    """What the run was trained from: the adapter's base directory, else the train config's model (None = default)."""
    files = find_run(run_dir)
    if files is not None and files.kind == "adapter":
        return adapter_base(files.weights_dir)
    return str(train_cfg.model) if train_cfg.model else DEFAULT_MODEL


def load_baseline(spec: str, run_tokenizer: Any, run_template: str, device: str = "auto") -> LoadedRun:
    """A run, or a base model prompted with the run's tokenizer and chat template (same prompts for both)."""
    baseline = load_run(spec, device=device)
    if baseline.kind != "base":
        return baseline
    if run_tokenizer.get_vocab().keys() >= baseline.tokenizer.get_vocab().keys():
        model = baseline.model
        if len(run_tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(run_tokenizer))  # the run added template tokens; the base never saw them
        return LoadedRun(model, run_tokenizer, "base", None, stop_token_ids(run_tokenizer))
    baseline.tokenizer.chat_template = run_template
    baseline.stop_token_ids = stop_token_ids(baseline.tokenizer)
    return baseline

