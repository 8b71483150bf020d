"""Prometheus metrics of one app: requests, latency, time to first token, tokens, queue depth, batch sizes, errors.

Use it like this::

    metrics = ServeMetrics(queue_depth=backend.queue_depth)      # its own registry: several apps per process
    metrics.observe_request("/v1/chat/completions", 200, latency_s=0.8, ttft_s=0.1, tokens_in=12, tokens_out=40)
    metrics.observe_error("rate_limit_error")
    metrics.batch_size.observe(8)                                   # the engine calls this per batch
    body, content_type = metrics.render()                           # GET /metrics

Names (all prefixed `chatforge_`): requests_total{route,status}, request_latency_seconds{route},
time_to_first_token_seconds{route}, tokens_in_total, tokens_out_total, queue_depth, batch_size, errors_total{type},
safeguard_actions_total{stage,action} (stage input|output; action blocked|redacted|moderation_error),
upstream_requests_total{upstream,outcome} (outcome ok|retried|failed|failed_after_streaming).
`route` is the route's path template (`/v1/chat/completions`) or "unmatched", so scanning unknown URLs cannot
grow the label set.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServeMetrics:
    """The app's collectors in a registry of their own (see the module docstring)."""

    def __init__(self, queue_depth: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chatforge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("chatforge_request_latency_seconds", "time from request to last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("chatforge_time_to_first_token_seconds", "time from request to first token", ["route"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("chatforge_tokens_in", "prompt tokens of answered requests", registry=r)
        self.tokens_out = Counter("chatforge_tokens_out", "generated tokens", registry=r)
        self.queue_depth = Gauge("chatforge_queue_depth", "requests waiting for the engine", registry=r)
        self.batch_size = Histogram("chatforge_batch_size", "requests decoded together per batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.errors = Counter("chatforge_errors", "error responses by OpenAI error type", ["type"], registry=r)
        self.safeguard_actions = Counter("chatforge_safeguard_actions", "what serve.safeguards did, by stage",
                                         ["stage", "action"], registry=r)
        self.upstream_requests = Counter("chatforge_upstream_requests", "requests sent to each upstream, by outcome",
                                         ["upstream", "outcome"], registry=r)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)

    def observe_request(self, route: str, status: int, latency_s: float, ttft_s: float | None = None,
                        tokens_in: int = 0, tokens_out: int = 0) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(latency_s)
        if ttft_s is not None:
            self.ttft.labels(route=route).observe(ttft_s)
        if tokens_in:
            self.tokens_in.inc(tokens_in)
        if tokens_out:
            self.tokens_out.inc(tokens_out)

    def observe_error(self, error_type: str) -> None:
        self.errors.labels(type=error_type).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
