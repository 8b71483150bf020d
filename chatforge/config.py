"""Every stage's settings, and the project file `chatforge.yaml` that holds them.

Use it like this::

    cfg = ProjectConfig.load(Path("chatforge.yaml"))      # or ProjectConfig() for the defaults
    prepare(inputs, out, cfg.prepare)

Each CLI flag maps onto one field here, and the field's description is the flag's help (chatforge/cli/options.py):
to add an option, add a described field and name it in the command's option list. A flag given on the command line
wins over the YAML. The YAML mirrors these models exactly (unknown keys are an error, so typos are caught), and
`chatforge init` writes a commented starter. The shared base is in config_base.py, the serve section in
config_serve.py; both are re-exported here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

# The shared base and the serve section live in their own modules (this file stays under ~400 lines); they are
# re-exported here so that `from chatforge.config import X` works for every section.
from chatforge.config_base import (
    DEVICE_CHOICES,
    DEVICE_HELP,
    DEVICE_SPEC,
    PII_TYPES,
    ConfigError,
    DeviceSpec,
    PiiConfig,
    StrictModel,
    check_device_spec,
    format_validation_error,
    merge_overrides,
)
from chatforge.config_serve import OAuthConfig, SafeguardsConfig, ServeConfig

__all__ = [
    "DEVICE_CHOICES", "DEVICE_HELP", "DEVICE_SPEC", "PII_TYPES", "AugmentConfig", "BalanceConfig", "BiasConfig",
    "CleanConfig", "ConfigError", "DataConfig", "DedupConfig", "DeviceSpec", "EarlyStopping", "EvalConfig",
    "FitConfig", "FormatOptions", "GenerationConfig", "LoraSettings", "OAuthConfig", "PiiConfig", "PrepareConfig",
    "ProjectConfig", "SafeguardsConfig", "ServeConfig", "SplitConfig", "StrictModel", "TrainConfig",
    "ValidateConfig", "check_device_spec", "format_validation_error", "merge_overrides", "parse_split",
    "starter_yaml",
]


class FormatOptions(StrictModel):
    """How to read inputs whose shape is not self-describing."""

    question_columns: list[str] = Field(
        default=["question", "prompt", "input", "q", "user"], description="CSV/TSV column for the user turn"
    )
    answer_columns: list[str] = Field(
        default=["answer", "response", "output", "a", "assistant"], description="CSV/TSV column for the reply"
    )
    category_column: str = Field(default="category", description="CSV/TSV column copied into meta.category")
    user_labels: list[str] = Field(default=["User", "Customer", "Human", "Q"], description="transcript speakers")
    assistant_labels: list[str] = Field(default=["Agent", "Assistant", "Bot", "Support", "A"])
    system_labels: list[str] = Field(default=["System"])


class CleanConfig(StrictModel):
    enabled: bool = Field(default=True, description="clean the text: unicode, HTML, repeated punctuation")
    unicode_nfkc: bool = True
    strip_html: bool = True
    collapse_punctuation: bool = Field(default=True, description="'!!!!!' -> '!!!', '.....' -> '...'")
    spelling: bool = Field(default=False, description="spelling correction (needs the 'spell' extra)")
    capitalize: bool = Field(default=False, description="capitalise the first letter of each message")


class DedupConfig(StrictModel):
    enabled: bool = Field(default=True, description="drop exact and near-duplicate conversations")
    exact: bool = True
    near: bool = True
    threshold: float = Field(default=0.85, ge=0.0, le=1.0, description="Jaccard similarity that counts as duplicate")
    ngram: int = Field(default=5, ge=1, description="word n-gram size for near-duplicate shingles")
    num_perm: int = Field(default=128, ge=16, description="MinHash permutations")


class FitConfig(StrictModel):
    enabled: bool = Field(default=True, description="count tokens and fit every example to max_tokens")
    model: str | None = Field(default=None, description="tokenizer source: HF dir, hub id or .gguf; None = default")
    chat_template: str | None = Field(default=None, description="named template (chatml, gemma, llama3) if needed")
    max_tokens: int = Field(default=1024, ge=16, description="longest example in tokens")
    overflow: Literal["split", "truncate", "drop"] = Field(default="split", description="an example past max_tokens: "
                                                           "split into several, truncate, or drop")


class BalanceConfig(StrictModel):
    enabled: bool = Field(default=False, description="balance the categories (see by, target, mode)")
    by: str = Field(default="category", description="meta field that holds the category")
    keyword_rules: dict[str, list[str]] = Field(
        default={}, description="category -> keywords; a record with no category gets the first rule that matches"
    )
    target: Literal["uniform"] | dict[str, float] = Field(default="uniform", description="wanted distribution")
    mode: Literal["cap", "upsample"] = "cap"
    seed: int = Field(default=0, description="seed of the up/down-sampling")


class AugmentConfig(StrictModel):
    enabled: bool = Field(default=False, description="add augmented copies (typos, swaps, synonyms) of training records")
    copies: int = Field(default=1, ge=1, description="augmented copies per training record")
    typo_rate: float = Field(default=0.03, ge=0.0, le=1.0, description="chance a word gets a character typo")
    swap_rate: float = Field(default=0.03, ge=0.0, le=1.0, description="chance of swapping a word with the next")
    synonym_rate: float = Field(default=0.05, ge=0.0, le=1.0, description="chance a word is replaced by a synonym")
    roles: list[str] = Field(default=["user"], description="which roles' messages are augmented")
    seed: int = Field(default=0, description="seed of the augmentation")


class SplitConfig(StrictModel):
    ratios: tuple[float, float, float] = Field(default=(0.8, 0.1, 0.1), description="train/val/test ratios, e.g. 80/10/10")
    seed: int = Field(default=0, description="seed of the split")
    stratify_by: str = "category"

    @field_validator("ratios", mode="before")
    @classmethod
    def _parse_ratios(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_split(value)
        return value

    @field_validator("ratios")
    @classmethod
    def _sum_to_one(cls, ratios: tuple[float, float, float]) -> tuple[float, float, float]:
        total = sum(ratios)
        if total <= 0 or any(r < 0 for r in ratios):
            raise ValueError("split ratios must be non-negative with a positive sum")
        return (ratios[0] / total, ratios[1] / total, ratios[2] / total)


def parse_split(text: str) -> tuple[float, float, float]:
    """Turn '70/15/15' (or '0.7,0.15,0.15') into three fractions that sum to one."""
    parts = [p for p in text.replace(",", "/").split("/") if p.strip()]
    if len(parts) != 3:
        raise ValueError(f"split {text!r}: expected three numbers like 80/10/10")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split {text!r}: expected three numbers like 80/10/10") from None
    total = sum(numbers)
    if total <= 0 or any(n < 0 for n in numbers):
        raise ValueError(f"split {text!r}: numbers must be non-negative with a positive sum")
    return (numbers[0] / total, numbers[1] / total, numbers[2] / total)


class ValidateConfig(StrictModel):
    """What makes a record acceptable, and the limits that keep one hostile record from hurting the run."""

    trailing_user: Literal["trim", "reject"] = Field(
        default="trim", description="a conversation that ends with user turns: trim them off and keep the rest "
        "(counted as 'trimmed' in the card), or reject it; one with no assistant turn left is rejected either way")
    max_record_bytes: int = Field(default=1_000_000, ge=1024, description="a record (JSONL line, CSV row, ...) "
                                  "larger than this goes to rejected.jsonl, without its content")


# `prepare.validate` is the name users write; pydantic only warns that it hides the deprecated BaseModel.validate.
warnings.filterwarnings("ignore", message='Field name "validate" in "PrepareConfig" shadows', category=UserWarning)


class PrepareConfig(StrictModel):
    """Settings of `chatforge prepare`; each step can be switched off."""

    format: str | None = Field(default=None, description="force one input format instead of auto-detection: openai, "
                              "sharegpt, alpaca, csv, tsv, chatterbot, transcript or parquet")
    formats: FormatOptions = FormatOptions()
    strict: bool = Field(default=False, description="stop at the first invalid record (exit 2)")
    require_assistant_last: bool = Field(default=True, description="false keeps conversations that end with a user "
                                         "turn as they are (e.g. prompts for evaluation); see validate.trailing_user")
    validate: ValidateConfig = ValidateConfig()
    clean: CleanConfig = CleanConfig()
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    fit: FitConfig = FitConfig()
    balance: BalanceConfig = BalanceConfig()
    augment: AugmentConfig = AugmentConfig()
    split: SplitConfig = SplitConfig()
    workers: int = Field(default=0, ge=0, description="processes for cleaning/redaction; 0 = one per CPU core")


class LoraSettings(StrictModel):
    r: int = Field(default=16, ge=1, description="LoRA rank")
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, le=1.0)
    target_modules: list[str] | None = Field(default=None, description="None = attention projections of the model")
    last_layers: int | None = Field(default=None, ge=1, description="adapt only the top N decoder layers: the backward "
                                    "pass stops below them (about half the step time on a CPU); None = all layers")
    train_template_tokens: bool = Field(default=False, description="also train the embedding rows of the chat "
                                        "template's turn tokens (a base model has barely trained them; helps it learn to stop)")


class EarlyStopping(StrictModel):
    patience: int | None = Field(default=3, ge=1, description="evaluations without improvement; None = off")
    min_delta: float = Field(default=0.0, ge=0.0, description="smallest val-loss drop that counts as improvement")


class TrainConfig(StrictModel):
    """Settings of `chatforge train`; the resolved copy is saved in the run directory."""

    data: str | None = Field(default=None, description="prepared dataset dir (train.jsonl, val.jsonl)")
    model: str | None = Field(default=None, description="base model: HF dir, hub id, .gguf or a packaged name; None = "
                                 "the default, gemma3-270m")
    chat_template: str | None = Field(default=None, description="chat template: a name (chatml, gemma, llama3) or a "
                                      ".jinja file; None = the tokenizer's own, else one its vocabulary fits")
    out: str | None = Field(default=None, description="run directory")
    method: Literal["lora", "full"] = Field(default="lora", description="LoRA adapters on a frozen base, or every weight")
    lora: LoraSettings = LoraSettings()
    merge: bool = Field(default=False, description="export the adapter merged into the base weights")
    train_on: Literal["assistant", "last_assistant", "all"] = Field(default="assistant", description="which tokens "
                                                                    "carry loss: every assistant turn, the last one, or all")
    max_length: int = Field(default=1024, ge=8, description="tokens per sequence (longer examples are cut)")
    packing: bool = Field(default=True, description="several conversations per sequence, no attention across them")
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] = Field(default="adamw", description="optimizer")
    lr: float = Field(default=2e-4, gt=0.0, description="learning rate (peak, after warmup)")
    weight_decay: float = Field(default=0.0, ge=0.0)
    schedule: Literal["constant", "linear", "cosine"] = Field(default="cosine", description="learning-rate schedule")
    warmup_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=4, ge=1, description="sequences per step per process")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    epochs: float = Field(default=1.0, gt=0.0, description="passes over the train split (fractions allowed)")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    max_train_examples: int | None = Field(default=None, ge=1, description="use only the first N train examples")
    max_val_examples: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, description="seed of initialisation, shuffling and dropout")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto = bf16 on GPUs that have it")
    device: DeviceSpec = Field(default="auto", description=f"{DEVICE_HELP}; also used by export and ensemble --soup")
    base_storage: Literal["fp32", "bf16", "fp16"] = Field(default="bf16", description="LoRA: bf16/fp16 keeps the "
                                                         "frozen base's weights in 16 bits (-0.5 GiB on Gemma 270M), computed in fp32; fp32 = all fp32")
    eval_every: int = Field(default=50, ge=1, description="steps between validations")
    early_stopping: EarlyStopping = EarlyStopping()
    save_every: int = Field(default=100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="last K kept, plus the best")
    log_every: int = Field(default=10, ge=1)
    histogram_every: int | None = Field(default=None, ge=1, description="steps between weight/grad histograms; "
                                        "None = about five per run, however short")
    loss_chunk: int | None = Field(default=None, ge=16, description="positions per LM-head chunk; None = ~128 MB of logits")
    gradient_checkpointing: bool | None = Field(default=None, description="recompute each layer's activations in "
                                                "backward (less memory, one more forward); None = on for LoRA, off for full")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None = all cores")
    max_minutes: float | None = Field(default=None, gt=0, description="stop training (and export) after this much step time")


class GenerationConfig(StrictModel):
    """How eval (and rating) decode answers; greedy unless temperature > 0."""

    max_new_tokens: int = Field(default=128, ge=1, description="longest generated answer, in tokens")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling (with temperature > 0)")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers a token's logit by "
                                     "this times its count in the answer so far")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers the logit of every "
                                    "token already in the answer by this")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="transformers' (CTRL): divides positive logits "
                                      "of tokens already seen by this; 1 = off")
    seed: int = 0
    batch_size: int = Field(default=16, ge=1, description="prompts decoded together")


class BiasConfig(StrictModel):
    """The counterfactual bias probe: bundled templates x term pairs per attribute, plus your own."""

    enabled: bool = Field(default=True, description="run the counterfactual bias probe")
    attributes: list[str] = Field(default=["gender", "ethnicity", "religion", "age", "nationality"],
                                  description="bundled attributes to probe; those your templates_file defines are always probed too")
    templates_file: str | None = Field(default=None, description="YAML of extra templates/terms, merged with the bundled set")
    loglik_threshold: float = Field(default=1.0, ge=0.0, description="flag a pair whose answer log-likelihood differs by more (nats, per answer)")
    sentiment_threshold: float = Field(default=0.5, ge=0.0, description="flag a pair whose answers' sentiment scores differ by more (-1..1 scale)")
    length_ratio_threshold: float = Field(default=2.0, ge=1.0, description="flag a pair whose answer lengths differ by more than this factor")
    max_new_tokens: int = Field(default=24, ge=1, description="answer length for sentiment, length and refusal")


class EvalConfig(StrictModel):
    """`chatforge eval`: which split, how to generate, the bias probe, the baseline."""

    data: str | None = Field(default=None, description="dataset dir; default: the one the run was trained on")
    split: str = Field(default="test", description="which split file of the dataset to evaluate")
    max_examples: int | None = Field(default=None, ge=1, description="evaluate at most this many conversations")
    baseline: str | None = Field(default=None, description="base model or run to compare with; default: the run's base model; 'none' = skip")
    name: str | None = Field(default=None, description="RUN/eval/NAME; default: the split name")
    batch_size: int = Field(default=8, ge=1, description="conversations per perplexity batch")
    generation: GenerationConfig = GenerationConfig()
    bias: BiasConfig = BiasConfig()
    label_max_classes: int = Field(default=20, ge=2, description="labels count as a classification task up to this many distinct values")
    device: DeviceSpec = Field(default="auto", description=f"{DEVICE_HELP}; also used by rate")


class DataConfig(StrictModel):
    """`chatforge run`: where the conversations come from and where the prepared dataset goes."""

    sources: list[str] = Field(default=[], description="files or folders to prepare, e.g. [tickets.csv, feedback.jsonl]")
    out: str = Field(default="chatforge-out/dataset", description="prepared dataset directory")


class ProjectConfig(StrictModel):
    """The project file: one section per stage. Sections not yet used by a stage are kept as free-form dicts."""

    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig = TrainConfig()
    sweep: dict[str, list[Any]] = Field(
        default={}, description="`chatforge sweep`: values to try per train setting, e.g. {lr: [1.0e-4, 3.0e-4], lora.r: [8, 16]}"
    )
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()

    @classmethod
    def load(cls, path: Path | None) -> ProjectConfig:
        """Read chatforge.yaml; None or a missing default file gives the defaults. Errors name the file and field."""
        if path is None:
            return cls()
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (prepare:, train:, ...)")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {format_validation_error(exc)}") from None


def starter_yaml() -> str:
    """A commented chatforge.yaml with every prepare option at its default (what `chatforge init` writes)."""
    lines = [
        "# chatforge project file. Every key is optional; shown values are the defaults.",
        "# Flags on the command line override these. Docs: README.md.",
        "",
    ]

    def emit(model: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            comment = f"  # {info.description}" if info.description else ""
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:{comment}")
                emit(value, indent + 1)
            else:
                if isinstance(value, tuple):
                    value = list(value)
                dumped = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
                dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
                lines.append(f"{pad}{name}: {dumped}{comment}")

    lines.append("# `chatforge run`: prepare -> train -> eval (-> serve) from this file; unchanged stages are skipped.")
    lines.append("data:")
    emit(DataConfig(), 1)
    lines += ["", "prepare:"]
    emit(PrepareConfig(), 1)
    lines += ["", "train:"]
    emit(TrainConfig(), 1)
    lines += ["", "# `chatforge sweep`: values to try for any train setting (dotted for nested ones); every combination runs.",
              "sweep: {}", "#  lr: [1.0e-4, 3.0e-4]", "#  lora.r: [8, 16]",
              "", "eval:"]
    emit(EvalConfig(), 1)
    lines += ["", "serve:"]
    emit(ServeConfig(), 1)
    lines.append("")
    return "\n".join(lines)
