"""Key management over the API (the admin scope), so the gateway runs without shell access to its store.

Call it like this::

    curl -s localhost:8000/v1/admin/keys -H "Authorization: Bearer $ADMIN_KEY" \\
         -d '{"name": "alice", "scopes": ["chat", "feedback"], "rpm": 60, "tpm": 20000}'   # 201: the secret, once
    curl -s localhost:8000/v1/admin/keys -H "Authorization: Bearer $ADMIN_KEY"              # every key, no secrets
    curl -s -X DELETE localhost:8000/v1/admin/keys/k_3f9a2c1d -H "Authorization: Bearer $ADMIN_KEY"

A revoke through this server refuses the key at once (its cached verification is dropped); other replicas on the
same database refuse it within their auth cache's 30 s. OAuth identities appear as keys named 'oauth:<subject>';
revoking one refuses that identity's tokens.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field, StrictInt
from starlette.concurrency import run_in_threadpool

from chatforge.serve.auth import require_scope
from chatforge.serve.errors import ApiError
from chatforge.serve.schemas import ErrorBody, StrictBody, Text
from chatforge.serve.state import serve_state
from chatforge.serve.store import ApiKey

admin_router = APIRouter(prefix="/v1/admin", tags=["admin"],
                         responses={status: {"model": ErrorBody} for status in (400, 401, 403, 404, 429)})
Scope = Literal["chat", "feedback", "admin"]


class KeyCreateRequest(StrictBody):
    name: Text = Field(min_length=1, max_length=100, description="who or what the key is for (printable text)")
    scopes: list[Scope] = Field(default=["chat", "feedback"], min_length=1, max_length=3)
    rpm: StrictInt | None = Field(default=60, ge=1, description="requests per minute; null = unlimited")
    tpm: StrictInt | None = Field(default=20000, ge=1, description="tokens per minute; null = unlimited")


class KeyInfo(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    scopes: list[str]
    rpm: int | None
    tpm: int | None
    created: datetime
    revoked: bool


class CreatedKey(KeyInfo):
    secret: str = Field(description="send as 'Authorization: Bearer <secret>'; shown this once, stored hashed")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


def key_info(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "object": "api_key", "name": key.name, "scopes": sorted(key.scopes), "rpm": key.rpm,
            "tpm": key.tpm, "created": key.created, "revoked": key.revoked}


@admin_router.post("/keys", response_model=CreatedKey, status_code=201)
async def create_key(body: KeyCreateRequest, request: Request,
                     _admin: ApiKey = Depends(require_scope("admin"))) -> dict[str, Any]:
    """Make a key; the answer holds its secret, which is never shown again."""
    try:
        secret, key = await run_in_threadpool(serve_state(request).store.create_key, body.name, body.scopes,
                                              body.rpm, body.tpm)
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_value", "name") from None
    return {**key_info(key), "secret": secret}


@admin_router.get("/keys", response_model=KeyList)
async def list_keys(request: Request, _admin: ApiKey = Depends(require_scope("admin"))) -> dict[str, Any]:
    """Every key, revoked ones too, oldest first; never a secret nor its hash."""
    keys = await run_in_threadpool(serve_state(request).store.list_keys)
    return {"object": "list", "data": [key_info(key) for key in keys]}


@admin_router.delete("/keys/{key_id}", response_model=KeyInfo)
async def revoke_key(request: Request, key_id: str = Path(pattern=r"^[ko]_[0-9a-f]{8,12}$"),
                     _admin: ApiKey = Depends(require_scope("admin"))) -> dict[str, Any]:
    """Revoke a key by id: it gets 401 from this server at once."""
    try:
        key = await run_in_threadpool(serve_state(request).store.revoke_key, key_id)
    except KeyError:
        raise ApiError(404, f"no key with id {key_id}; GET /v1/admin/keys lists them", "key_not_found",
                       "key_id") from None
    return key_info(key)
