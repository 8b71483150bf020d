"""What the serve app's routes share: the ServeState of the app and the RequestInfo of each request.

Use them in a route like this::

    @router.get("/v1/x")
    async def x(request: Request) -> dict:
        state = serve_state(request)          # cfg, store, backend, limiter, metrics, auth guard, OAuth verifier
        request_info(request).model = ...     # what the access log and the requests table will say

`create_app` (app.py) builds the ServeState; the middleware (middleware.py) makes each request's RequestInfo.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from fastapi import Request

from chatforge.config import ServeConfig
from chatforge.serve.backends import Backend
from chatforge.serve.keys import FailedAuthGuard
from chatforge.serve.limits import RateLimiter
from chatforge.serve.metrics import ServeMetrics
from chatforge.serve.oauth import OAuthVerifier
from chatforge.serve.safeguards import Safeguards
from chatforge.serve.store import Store


@dataclass
class ServeState:
    """What the routes share (app.state.serve).

    `feedback_work` bounds how many feedback redactions (CPU-heavy, on text a client chose) run at once in worker
    threads, so a flood of them can neither take every thread of the pool nor starve the event loop.
    """

    cfg: ServeConfig
    store: Store
    backend: Backend
    limiter: RateLimiter
    metrics: ServeMetrics
    auth_guard: FailedAuthGuard
    oauth: OAuthVerifier | None
    feedback_work: anyio.CapacityLimiter
    safeguards: Safeguards


@dataclass
class RequestInfo:
    """What one request did, filled in by the routes and read by the access log (request.state.info)."""

    request_id: str
    started: float
    key_id: str | None = None
    model: str | None = None
    ttft_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    error_type: str | None = None


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve


def request_info(request: Request) -> RequestInfo:
    return request.state.info
