"""The FastAPI app of `chatforge serve`: the factory that wires state, routes, errors, auth and middleware.

Use it like this::

    app = create_app(ServeConfig(run="runs/r1", db="sqlite:///chatforge.db"))     # nothing loads until startup
    uvicorn.Server(uvicorn_config(app, cfg)).run()            # server.py: connection cap, header deadline
    # tests: create_app(cfg, store=Store(url), backend=TorchBackend(cfg, loaded=loaded))

Routes (routes.py, admin.py): POST /v1/chat/completions, /v1/completions, /v1/feedback; GET /v1/models, /health,
/ready, /metrics, / (the chat page); POST/GET /v1/admin/keys, DELETE /v1/admin/keys/{id}. Auth (auth.py):
`Authorization: Bearer <API key or OAuth JWT>`. Errors (errors.py): OpenAI's error body for every failure.
Middleware (middleware.py): request ids, the body's size cap and read deadline, access log, metrics, records;
and security headers on every response (chatforge.httpsec). /docs, /redoc and /openapi.json exist only with
serve.api_docs: true.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from chatforge.config import ServeConfig
from chatforge.httpsec import SecurityHeadersMiddleware
from chatforge.serve.admin import admin_router
from chatforge.serve.backends import Backend, make_backend
from chatforge.serve.errors import install_error_handlers
from chatforge.serve.keys import FailedAuthGuard
from chatforge.serve.limits import RateLimiter
from chatforge.serve.metrics import ServeMetrics
from chatforge.serve.middleware import GatewayMiddleware
from chatforge.serve.oauth import OAuthVerifier
from chatforge.serve.routes import router
from chatforge.serve.safeguards import Safeguards
from chatforge.serve.state import ServeState
from chatforge.serve.store import Store


def create_app(cfg: ServeConfig, store: Store | None = None, backend: Backend | None = None) -> FastAPI:
    """The app serving `cfg` (see the module docstring); its lifespan starts and closes `backend`."""
    store = store if store is not None else Store(cfg.db, pii=cfg.pii, auth_cache_s=cfg.key_cache_s)
    backend = backend if backend is not None else make_backend(cfg)
    metrics = ServeMetrics(queue_depth=backend.queue_depth)
    if hasattr(backend, "on_batch"):
        backend.on_batch = metrics.batch_size.observe
    if hasattr(backend, "on_outcome"):  # the upstream backend: retries and failures per upstream
        backend.on_outcome = lambda upstream, outcome: metrics.upstream_requests.labels(upstream, outcome).inc()
    guard = FailedAuthGuard(failures_per_address=cfg.auth_failures_per_address,
                            failures_per_key=cfg.auth_failures_per_key)
    oauth = OAuthVerifier(cfg.oauth) if cfg.oauth is not None else None
    state = ServeState(cfg, store, backend, RateLimiter(store), metrics, guard, oauth,
                       anyio.CapacityLimiter(cfg.feedback_threads), Safeguards(cfg, metrics))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.close()
            if oauth is not None:
                await oauth.close()

    docs = cfg.api_docs
    app = FastAPI(title="chatforge", summary="OpenAI-compatible API of a chatforge run", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.serve = state
    app.include_router(router)
    app.include_router(admin_router)
    install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, state=state)
    app.add_middleware(SecurityHeadersMiddleware)
    return app
