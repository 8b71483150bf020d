"""OAuth2 / OIDC bearer tokens (JWTs) beside API keys, checked with PyJWT against the issuer's JWKS.

Use it like this (the auth dependency does, when `serve.oauth` is set)::

    verifier = OAuthVerifier(cfg.oauth)                    # jwks_url (fetched with httpx) or jwks_file
    identity = await verifier.verify(token)                # Identity(subject='alice', scopes={'chat'}), or
                                                           # OAuthError('the token has expired')
    await verifier.close()

A token passes when its header's `alg` is in `serve.oauth.algorithms` (asymmetric ones only, so `none` and HS*
signed with a public key never pass), its `kid` is in the key set, the signature checks with that key, `exp` is in
the future and `nbf`/`iat` not (with `leeway_s`), `iss` is the issuer and `aud` names the audience. The key set is
cached for `jwks_cache_s`; an unknown `kid` refetches it, at most once per `jwks_refresh_min_s` (so tokens with
made-up kids cannot make us hammer the issuer). Scopes come from `scopes_claim` (a space-separated string or a
list; dotted for nested claims, e.g. realm_access.roles), mapped by `scope_map`; the identity from
`identity_claim`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from chatforge.config import OAuthConfig
from chatforge.serve.keys import SCOPES

MAX_TOKEN_CHARS = 16384
MAX_JWKS_BYTES = 1_000_000


class OAuthError(Exception):
    """A token that does not authenticate; the message says why (for the client's 401)."""


@dataclass(frozen=True)
class Identity:
    subject: str
    scopes: frozenset[str]


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts: a JWS compact token (API keys never have dots)."""
    return token.count(".") == 2


class OAuthVerifier:
    """Checks JWTs of one issuer; see the module docstring. One per app; safe for concurrent requests."""

    def __init__(self, cfg: OAuthConfig, client: httpx.AsyncClient | None = None,
                 clock: Any = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._client = client
        self._keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}  # kid -> (key, the alg its JWK declares)
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def verify(self, token: str) -> Identity:
        """The token's identity and scopes, or OAuthError naming what is wrong."""
        if len(token) > MAX_TOKEN_CHARS:
            raise OAuthError(f"the bearer token is over {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise OAuthError("the bearer token is neither an API key nor a well-formed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.cfg.algorithms:
            raise OAuthError(f"the token's alg {str(alg)[:20]!r} is not accepted (accepted: "
                             f"{', '.join(self.cfg.algorithms)})")
        if not isinstance(kid, str) or not kid:
            raise OAuthError("the token has no kid (key id) in its header")
        key, declared_alg = await self._key(kid)
        if declared_alg not in (None, alg):
            raise OAuthError(f"the token's key {kid[:64]!r} is for {declared_alg}, not {alg}")
        try:
            claims = jwt.decode(token, key=key.key, algorithms=[alg], audience=self.cfg.audience,
                                issuer=self.cfg.issuer, leeway=self.cfg.leeway_s,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise OAuthError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise OAuthError("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise OAuthError(f"the token is not for this audience (expected {self.cfg.audience!r})") from None
        except jwt.InvalidIssuerError:
            raise OAuthError(f"the token is not from the configured issuer ({self.cfg.issuer!r})") from None
        except jwt.InvalidSignatureError:
            raise OAuthError("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise OAuthError(f"the token is invalid: {str(exc)[:200]}") from None
        subject = claims.get(self.cfg.identity_claim)
        if not isinstance(subject, str | int) or not str(subject).strip() or len(str(subject)) > 200:
            raise OAuthError(f"the token has no usable {self.cfg.identity_claim!r} claim")
        return Identity(str(subject), self._scopes(claims))

    def _scopes(self, claims: dict[str, Any]) -> frozenset[str]:
        value: Any = claims
        for part in self.cfg.scopes_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
        mapped = {self.cfg.scope_map.get(v, v) for v in values if isinstance(v, str)}
        return frozenset(mapped & SCOPES)

    async def _key(self, kid: str) -> tuple[jwt.PyJWK, str | None]:
        now = self.clock()
        stale = self._fetched_at is None or now - self._fetched_at > self.cfg.jwks_cache_s
        if stale or (kid not in self._keys and now - (self._fetched_at or 0.0) >= self.cfg.jwks_refresh_min_s):
            async with self._lock:  # one refetch for everyone waiting on it
                now = self.clock()
                stale = self._fetched_at is None or now - self._fetched_at > self.cfg.jwks_cache_s
                if stale or (kid not in self._keys and now - (self._fetched_at or 0.0) >= self.cfg.jwks_refresh_min_s):
                    await self._refresh()
        found = self._keys.get(kid)
        if found is None:
            raise OAuthError(f"the token's key id {kid[:64]!r} is not in the issuer's key set")
        return found

    async def _refresh(self) -> None:
        """Reload the key set; on failure keep the old one (and try again after jwks_refresh_min_s)."""
        self._fetched_at = self.clock()
        try:
            document = await self._fetch()
            keys = {}
            for entry in document.get("keys", []):
                if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
                    continue
                if entry.get("use") not in (None, "sig") or entry.get("kty") == "oct":  # never a shared secret
                    continue
                try:
                    declared = entry.get("alg") if isinstance(entry.get("alg"), str) else None
                    keys[entry["kid"]] = (jwt.PyJWK.from_dict(entry), declared)
                except jwt.PyJWTError:
                    continue
            self._keys = keys
        except (httpx.HTTPError, OSError, ValueError) as exc:
            if not self._keys:
                raise OAuthError(f"the issuer's key set cannot be read now ({type(exc).__name__})") from None

    async def _fetch(self) -> dict[str, Any]:
        if self.cfg.jwks_file is not None:
            text = await asyncio.to_thread(Path(self.cfg.jwks_file).read_text, encoding="utf-8")
        else:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), follow_redirects=False)
            response = await self._client.get(self.cfg.jwks_url or "")
            response.raise_for_status()
            if len(response.content) > MAX_JWKS_BYTES:
                raise ValueError("the JWKS document is too large")
            text = response.text
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("the JWKS document is not a JSON object")  # noqa: TRY004  (caught with the parse errors)
        return document
