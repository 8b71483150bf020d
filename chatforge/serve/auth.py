"""Who is calling: the `require_scope` dependency of every keyed route (API keys, and OAuth JWTs when configured).

Use it in a route like this::

    @router.get("/v1/models")
    async def models(key: ApiKey = Depends(require_scope("chat"))) -> ...

The header is `Authorization: Bearer <API key or JWT>`: 401 when it is missing, malformed, unknown, wrong, expired
or revoked; 403 when the caller lacks the route's scope (chat: completions and models; feedback: /v1/feedback;
admin: /metrics and /v1/admin/keys). A key verified in the last seconds is taken from memory (no hashing). Anything
else first passes the FailedAuthGuard: a secret that failed before is refused at once (401), and an address or key
id with too many recent failures gets 429 + Retry-After, all without running scrypt. A JWT (serve.oauth) is checked
by the OAuthVerifier and stands for the store's row of its identity (`Store.identity_key`), so rate limits,
records and feedback ownership key on the identity claim.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from chatforge.serve.errors import ApiError
from chatforge.serve.oauth import OAuthError, looks_like_jwt
from chatforge.serve.state import ServeState, request_info, serve_state
from chatforge.serve.store import ApiKey

bearer = HTTPBearer(auto_error=False, description="an API key from `chatforge keys create`, or an OAuth2 access "
                                                  "token (JWT) of the issuer in serve.oauth")


def require_scope(scope: str) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency that yields the caller's ApiKey, or answers 401 / 403 / 429 (see the module docstring)."""

    async def authenticated_key(request: Request,
                                _credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer <key>'", "missing_api_key")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(401, "the Authorization header must be 'Bearer <key>'", "invalid_authorization_header")
        key = await authenticate(request, serve_state(request), secret.strip())
        request_info(request).key_id = key.id
        if scope not in key.scopes:
            raise ApiError(403, f"key {key.id} lacks the '{scope}' scope (it has: "
                                f"{', '.join(sorted(key.scopes)) or 'none'})", "insufficient_scope")
        return key

    return authenticated_key


async def authenticate(request: Request, state: ServeState, token: str) -> ApiKey:
    """The ApiKey `token` stands for, or ApiError 401/429."""
    cached = state.store.cached_key(token)
    if cached is not None:
        return cached
    address = request.client.host if request.client else "unknown"
    refusal = state.auth_guard.admit(address, token)
    if refusal is not None:
        status, message, retry_after_s = refusal
        raise ApiError(status, message, "invalid_api_key" if status == 401 else "too_many_failed_authentications",
                       retry_after_s=retry_after_s)
    if state.oauth is not None and looks_like_jwt(token):
        assert state.cfg.oauth is not None
        try:
            identity = await state.oauth.verify(token)
        except OAuthError as exc:
            state.auth_guard.failed(token, remember_secret=False)
            raise ApiError(401, str(exc), "invalid_token") from None
        state.auth_guard.succeeded(address, token)
        key = await run_in_threadpool(state.store.identity_key, identity.subject, identity.scopes,
                                      state.cfg.oauth.rpm, state.cfg.oauth.tpm)
        if key.revoked:
            raise ApiError(401, f"the identity {key.name!r} is revoked on this server", "revoked_identity")
        return key
    key = await run_in_threadpool(state.store.authenticate, token)
    if key is None:
        state.auth_guard.failed(token)
        raise ApiError(401, "invalid or revoked API key", "invalid_api_key")
    state.auth_guard.succeeded(address, token)
    return key
