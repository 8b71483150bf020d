"""Every stage's settings, and the project file `chatforge.yaml` that holds them.

Use it like this::

    cfg = ProjectConfig.load(Path("chatforge.yaml"))      # or ProjectConfig() for the defaults
    prepare(inputs, out, cfg.prepare)

Each CLI flag maps onto one field here; a flag given on the command line wins over the YAML. The YAML mirrors these
models exactly (unknown keys are an error, so typos are caught), and `chatforge init` writes a commented starter.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are an error, so a typo in chatforge.yaml never passes silently."""

    model_config = ConfigDict(extra="forbid")


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
    enabled: bool = True
    unicode_nfkc: bool = True
    strip_html: bool = True
    collapse_punctuation: bool = Field(default=True, description="'!!!!!' -> '!!!', '.....' -> '...'")
    spelling: bool = Field(default=False, description="spelling correction (needs the 'spell' extra)")
    capitalize: bool = Field(default=False, description="capitalise the first letter of each message")


PII_TYPES = ["EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "URL_CREDENTIALS", "API_KEY", "SSN", "PERSON"]


class PiiConfig(StrictModel):
    enabled: bool = True
    types: list[str] = Field(
        default=[t for t in PII_TYPES if t != "PERSON"], description=f"which of {PII_TYPES} to redact"
    )
    person_names: bool = Field(default=False, description="detect person names with Presidio (when installed)")

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        unknown = sorted(set(types) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"unknown PII types {unknown}; known: {PII_TYPES}")
        return types


class DedupConfig(StrictModel):
    enabled: bool = True
    exact: bool = True
    near: bool = True
    threshold: float = Field(default=0.85, ge=0.0, le=1.0, description="Jaccard similarity that counts as duplicate")
    ngram: int = Field(default=5, ge=1, description="word n-gram size for near-duplicate shingles")
    num_perm: int = Field(default=128, ge=16, description="MinHash permutations")


class FitConfig(StrictModel):
    enabled: bool = True
    model: str | None = Field(default=None, description="tokenizer source: HF dir, hub id or .gguf; None = default")
    chat_template: str | None = Field(default=None, description="named template (chatml, gemma, llama3) if needed")
    max_tokens: int = Field(default=1024, ge=16)
    overflow: Literal["split", "truncate", "drop"] = "split"


class BalanceConfig(StrictModel):
    enabled: bool = False
    by: str = Field(default="category", description="meta field that holds the category")
    keyword_rules: dict[str, list[str]] = Field(
        default={}, description="category -> keywords; a record with no category gets the first rule that matches"
    )
    target: Literal["uniform"] | dict[str, float] = Field(default="uniform", description="wanted distribution")
    mode: Literal["cap", "upsample"] = "cap"
    seed: int = 0


class AugmentConfig(StrictModel):
    enabled: bool = False
    copies: int = Field(default=1, ge=1, description="augmented copies per training record")
    typo_rate: float = Field(default=0.03, ge=0.0, le=1.0, description="chance a word gets a character typo")
    swap_rate: float = Field(default=0.03, ge=0.0, le=1.0, description="chance of swapping a word with the next")
    synonym_rate: float = Field(default=0.05, ge=0.0, le=1.0, description="chance a word is replaced by a synonym")
    roles: list[str] = Field(default=["user"], description="which roles' messages are augmented")
    seed: int = 0


class SplitConfig(StrictModel):
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
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

    format: str | None = Field(default=None, description="force one input format instead of auto-detection")
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
    r: int = Field(default=16, ge=1)
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


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


def check_device_spec(spec: str) -> str:
    """`spec` lower-cased if it names a device kind (see chatforge.device); else ValueError."""
    normalised = spec.strip().lower()
    if not DEVICE_SPEC.match(normalised):
        raise ValueError(f"device {spec!r}: expected {DEVICE_CHOICES}")
    return normalised


DeviceSpec = Annotated[str, AfterValidator(check_device_spec)]
DEVICE_HELP = "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"


class TrainConfig(StrictModel):
    """Settings of `chatforge train`; the resolved copy is saved in the run directory."""

    data: str | None = Field(default=None, description="prepared dataset dir (train.jsonl, val.jsonl)")
    model: str | None = Field(default=None, description="base model: HF dir, hub id or .gguf; None = default")
    chat_template: str | None = Field(default=None, description="chat template: a name (chatml, gemma, llama3) or a "
                                      ".jinja file; None = the tokenizer's own, else one its vocabulary fits")
    out: str | None = Field(default=None, description="run directory")
    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    merge: bool = Field(default=False, description="export the adapter merged into the base weights")
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    max_length: int = Field(default=1024, ge=8, description="tokens per sequence (longer examples are cut)")
    packing: bool = Field(default=True, description="several conversations per sequence, no attention across them")
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] = "adamw"
    lr: float = Field(default=2e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=4, ge=1, description="sequences per step per process")
    grad_accum: int = Field(default=1, ge=1)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    max_train_examples: int | None = Field(default=None, ge=1, description="use only the first N train examples")
    max_val_examples: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    seed: int = 0
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

    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
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

    enabled: bool = True
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


class OAuthConfig(StrictModel):
    """`serve.oauth`: accept JWT bearer tokens of one OAuth2/OIDC issuer beside API keys.

    serve:
      oauth: {issuer: https://id.example.com/realms/x, audience: chatforge,
              jwks_url: https://id.example.com/realms/x/protocol/openid-connect/certs,
              scopes_claim: scope, scope_map: {"chatforge.chat": chat}, identity_claim: sub}
    """

    issuer: str = Field(description="the tokens' `iss`, exactly")
    audience: str = Field(description="the `aud` a token must name")
    jwks_url: str | None = Field(default=None, description="the issuer's JWKS (fetched, cached, refreshed on an unknown kid)")
    jwks_file: str | None = Field(default=None, description="a local JWKS file instead of jwks_url")
    algorithms: list[Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]] = Field(
        default=["RS256", "ES256"], min_length=1, description="accepted `alg`s (asymmetric only: never none or HS*)")
    scopes_claim: str = Field(default="scope", description="claim holding the scopes (space-separated or a list; a.b for nested)")
    scope_map: dict[str, Literal["chat", "feedback", "admin"]] = Field(
        default={}, description="claim value -> chatforge scope; values named chat/feedback/admin map to themselves")
    identity_claim: str = Field(default="sub", description="claim naming the caller: rate limits and records key on it")
    leeway_s: float = Field(default=30.0, ge=0, le=300, description="clock skew allowed on exp/nbf/iat")
    rpm: int | None = Field(default=60, ge=1, description="requests per minute per identity (null = unlimited)")
    tpm: int | None = Field(default=20000, ge=1, description="tokens per minute per identity (null = unlimited)")
    jwks_cache_s: float = Field(default=300.0, gt=0, description="how long a fetched JWKS is trusted")
    jwks_refresh_min_s: float = Field(default=30.0, ge=0, description="at most one refetch per this many seconds on unknown kids")

    @model_validator(mode="after")
    def _one_key_source(self) -> OAuthConfig:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of serve.oauth.jwks_url and serve.oauth.jwks_file")
        return self


class SafeguardsConfig(StrictModel):
    """`serve.safeguards`: what the gateway checks in prompts and answers (see chatforge/serve/safeguards.py)."""

    redact_output: bool = Field(default=False, description="replace PII in answers with [TYPE] placeholders (the serve.pii types)")
    blocklist: list[str] = Field(default=[], description="words or phrases (case-insensitive, whole words) that block a prompt or an answer")
    patterns: list[str] = Field(default=[], description="RE2 regular expressions (linear time: no backreferences or lookaround) that block a prompt or an answer")
    check: list[Literal["input", "output"]] = Field(default=["input", "output"], description="where the blocklist and patterns apply")
    moderation_url: str | None = Field(default=None, description="OpenAI-compatible moderation endpoint, e.g. http://mod:8000/v1/moderations ($CHATFORGE_MODERATION_API_KEY)")
    moderation_model: str | None = None
    moderation_timeout_s: float = Field(default=5.0, gt=0)
    moderation_fail_open: bool = Field(default=False, description="when the moderation endpoint fails: true lets the text through, false blocks it")
    moderation_chunk_chars: int = Field(default=400, ge=16, description="a stream is moderated (and released) in pieces of this many characters")
    stream_window_chars: int = Field(default=64, ge=8, description="characters a stream holds back so a match or PII split across tokens is caught before it is sent")
    refusal: str = Field(default="I can't help with that.", description="the answer that replaces a blocked one (finish_reason content_filter)")

    @field_validator("patterns")
    @classmethod
    def _linear_patterns(cls, patterns: list[str]) -> list[str]:
        import re2  # the serve extra (google-re2); only a config that sets patterns needs it

        for position, pattern in enumerate(patterns):
            try:
                re2.compile(pattern)
            except re2.error as exc:
                detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                raise ValueError(f"patterns[{position}] {pattern!r} is not an RE2 expression ({detail}); RE2 runs "
                                 "in linear time, so it has no backreferences or lookaround") from None
        return patterns

    @field_validator("blocklist")
    @classmethod
    def _non_blank(cls, words: list[str]) -> list[str]:
        blank = [position for position, word in enumerate(words) if not word.strip()]
        if blank:
            raise ValueError(f"blocklist[{blank[0]}] is blank")
        return words


class ServeConfig(StrictModel):
    """`chatforge serve`: where it listens, what it stores, how much it takes on."""

    run: str | None = Field(default=None, description="run dir (adapter, full or ensemble) or base model to serve")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    db: str = Field(default="sqlite:///chatforge.db", description="SQLAlchemy URL: sqlite:///file.db or postgresql://...")
    backend: Literal["torch", "llamacpp", "upstream"] = "torch"
    device: DeviceSpec = Field(default="auto", description=f"backend torch: {DEVICE_HELP}")
    upstream_url: str | None = Field(default=None, description="OpenAI-compatible server (vLLM, llama.cpp) for backend upstream")
    gguf: str | None = Field(default=None, description="GGUF file for backend llamacpp (default: the run, exported and cached)")
    gguf_quant: Literal["q8_0", "f16", "f32"] = Field(default="q8_0", description="how backend llamacpp exports the run")
    quantize: Literal["none", "int8"] = Field(default="none", description="torch backend: int8 weights for the linear layers and LM head (CPU, dynamic quantisation)")
    max_batch: int = Field(default=8, ge=1, description="requests decoded together")
    max_queue: int = Field(default=64, ge=1, description="waiting requests beyond this get 503 + Retry-After")
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="larger request bodies get 413")
    default_max_tokens: int = Field(default=256, ge=1)
    store_conversations: bool = Field(default=True, description="keep (PII-redacted) conversations for feedback; per request `store: false` opts out")
    pii: PiiConfig = PiiConfig()
    # hardening against hostile clients
    max_tokens_limit: int = Field(default=8192, ge=1, description="max_tokens above this is a 400 (also when the backend's context is unknown)")
    max_feedback_chars: int = Field(default=8000, ge=1, description="longer feedback corrections or comments are a 400")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a connection must send its request headers within this")
    body_timeout_s: float = Field(default=30.0, gt=0, description="a request must send its whole body within this, else 408")
    keep_alive_s: int = Field(default=5, ge=1, description="idle keep-alive connections close after this")
    max_connections: int = Field(default=512, ge=1, description="open connections beyond this get 503 (capped below the descriptor limit)")
    auth_failures_per_address: int = Field(default=20, ge=1, description="failed authentications per minute from one address before 429")
    auth_failures_per_key: int = Field(default=50, ge=1, description="failed authentications per minute for one key id before 429")
    feedback_threads: int = Field(default=1, ge=1, description="feedback redactions running at once (worker threads; CPU-bound work holds the GIL, so more starve the event loop)")
    api_docs: bool = Field(default=False, description="serve /docs, /redoc and /openapi.json (off: they map the API for anyone)")
    oauth: OAuthConfig | None = Field(default=None, description="accept OAuth2/OIDC JWTs beside API keys")


    # --- several replicas and upstreams, output safeguards (docs/deploy.md) ---
    key_cache_s: float = Field(default=5.0, ge=0, description="seconds a verified key is trusted without the database; a revoke on another replica or the CLI takes effect within it")
    upstreams: list[str] = Field(default=[], description="OpenAI-compatible servers for backend upstream, least busy healthy one first, with failover (upstream_url adds one)")
    upstream_health_s: float = Field(default=5.0, gt=0, description="seconds between health checks (GET /models) of each upstream")
    safeguards: SafeguardsConfig = SafeguardsConfig()


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


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the file and the field."""


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: 'prepare.split.ratios: split '1/2': expected three numbers'."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def merge_overrides(cfg: BaseModel, overrides: dict[str, Any]) -> Any:
    """Return a copy of cfg with dotted-path overrides applied (`{"fit.max_tokens": 512}`); None values are ignored."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return type(cfg).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


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
