"""The settings of `chatforge serve`: where it listens, its limits, OAuth and the output safeguards.

Use it like this::

    cfg = ProjectConfig.load(Path("chatforge.yaml")).serve     # or ServeConfig(run="runs/r1", port=8080)
    app = create_app(cfg, store)

`chatforge.config` re-exports these, so `from chatforge.config import ServeConfig` keeps working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from chatforge.config_base import DEVICE_HELP, DeviceSpec, PiiConfig, StrictModel


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
    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    db: str = Field(default="sqlite:///chatforge.db", description="SQLAlchemy URL: sqlite:///file.db or postgresql://...")
    backend: Literal["auto", "torch", "llamacpp", "llamaserver", "upstream"] = Field(default="auto", description="auto (llamaserver on a CPU when llama-server is built and the model converts to GGUF, else torch), torch (the in-process engine), llamaserver (llama.cpp's llama-server started by chatforge: the fastest on CPU), llamacpp (llama-cpp-python, one request at a time) or upstream (forward to OpenAI-compatible servers)")
    threads: int | None = Field(default=None, ge=1, description="CPU threads of the engine (torch or llama-server); None = all cores")
    device: DeviceSpec = Field(default="auto", description=f"{DEVICE_HELP} (backend torch)")
    upstream_url: str | None = Field(default=None, description="OpenAI-compatible server (vLLM, llama.cpp) for backend upstream")
    gguf: str | None = Field(default=None, description="GGUF file for backends llamacpp and llamaserver (default: the run, exported and cached)")
    gguf_quant: Literal["q8_0", "f16", "f32"] = Field(default="q8_0", description="how backends llamacpp and llamaserver export the run")
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
