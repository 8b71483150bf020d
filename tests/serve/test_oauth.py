"""OAuth2 / OIDC bearer tokens beside API keys: a JWKS served over real HTTP on loopback, RS256 and ES256 tokens
signed here; valid ones pass, expired / wrong audience / wrong issuer / unknown kid / alg none / HS256 signed with
the public key get a 401 in OpenAI's error shape; scopes and the rate-limit identity come from the claims."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatforge.config import OAuthConfig
from chatforge.models.run import LoadedRun
from chatforge.serve.oauth import OAuthError, OAuthVerifier
from tests.serve.conftest import RunningServer, running_server, started_server
from tests.serve.test_api import assert_openai_error, bearer

ISSUER = "https://id.example.test/realms/chat"
AUDIENCE = "chatforge"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


class Issuer:
    """Signing keys (RSA and EC) and the JWKS that publishes their public halves; counts JWKS fetches."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.fetches = 0

    def jwks(self) -> dict[str, Any]:
        return {"keys": [
            {**json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key())), "kid": "rsa-1", "use": "sig", "alg": "RS256"},
            {**json.loads(ECAlgorithm.to_jwk(self.ec.public_key())), "kid": "ec-1", "use": "sig", "alg": "ES256"}]}

    def token(self, alg: str = "RS256", kid: str | None = None, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
                  "scope": "openid chatforge.chat chatforge.feedback"}
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        key = self.rsa if alg == "RS256" else self.ec
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid or ("rsa-1" if alg == "RS256" else "ec-1")})

    def public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def valid_claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 600, "scope": "chatforge.chat"}


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def jwks_url(issuer: Issuer) -> Iterator[str]:
    async def jwks(_request: Request) -> JSONResponse:
        issuer.fetches += 1
        return JSONResponse(issuer.jwks())

    with running_server(Starlette(routes=[Route("/certs", jwks)])) as url:
        yield url + "/certs"


@pytest.fixture(scope="module")
def oauth_server(served_model: LoadedRun, serve_run: Path, jwks_url: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    oauth = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": jwks_url, "rpm": 3, "tpm": None,
             "scope_map": {"chatforge.chat": "chat", "chatforge.feedback": "feedback", "chatforge.admin": "admin"},
             "jwks_refresh_min_s": 60}
    with started_server(served_model, serve_run, tmp_path_factory.mktemp("oauth") / "db.sqlite",
                        oauth=oauth) as running:
        yield running


def test_valid_rs256_and_es256_tokens_are_accepted(oauth_server: RunningServer, issuer: Issuer) -> None:
    listed = httpx.get(oauth_server.url + "/v1/models", headers=bearer(issuer.token("RS256", sub="reader")))
    assert listed.status_code == 200 and listed.json()["data"][0]["id"] == oauth_server.model_id
    chat = httpx.post(oauth_server.url + CHAT, headers=bearer(issuer.token("ES256", sub="writer")),
                      json={"messages": HELLO, "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    api_key = oauth_server.new_key("still-works")  # API keys keep working beside OAuth
    assert httpx.get(oauth_server.url + "/v1/models", headers=bearer(api_key)).status_code == 200


def bad_tokens(issuer: Issuer) -> dict[str, str]:
    claims = valid_claims()
    signing_input_header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    unsigned = unsigned_token(signing_input_header, claims)
    signing_input = unsigned.rsplit(".", 1)[0].encode()
    hs256_with_public_key = signing_input.decode() + "." + b64(
        hmac.new(issuer.public_pem(), signing_input, hashlib.sha256).digest())
    return {
        "expired": issuer.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "wrong audience": issuer.token(aud="someone-else"),
        "wrong issuer": issuer.token(iss="https://evil.example.test"),
        "unknown kid": issuer.token(kid="rsa-9"),
        "alg none": unsigned_token({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims),
        "HS256 with the public key": hs256_with_public_key,
        "EC key used for RS256": issuer.token("ES256", kid="rsa-1"),
        "no exp": issuer.token(exp=None),
        "garbage": "a.b.c",
    }


@pytest.mark.parametrize("case", ["expired", "wrong audience", "wrong issuer", "unknown kid", "alg none",
                                  "HS256 with the public key", "EC key used for RS256", "no exp", "garbage"])
def test_bad_tokens_get_401_in_openai_shape(oauth_server: RunningServer, issuer: Issuer, case: str) -> None:
    response = httpx.get(oauth_server.url + "/v1/models", headers=bearer(bad_tokens(issuer)[case]))
    error = assert_openai_error(response, 401, "authentication_error", "invalid_token")
    assert "token" in error["message"]


def test_unknown_kids_refetch_the_key_set_at_most_once_per_interval(oauth_server: RunningServer,
                                                                    issuer: Issuer) -> None:
    httpx.get(oauth_server.url + "/v1/models", headers=bearer(issuer.token()))  # the key set is loaded
    before = issuer.fetches
    for n in range(5):
        response = httpx.get(oauth_server.url + "/v1/models", headers=bearer(issuer.token(kid=f"made-up-{n}")))
        assert_openai_error(response, 401, "authentication_error", "invalid_token")
    assert issuer.fetches - before <= 1


def test_scopes_come_from_the_claim_and_the_identity_is_rate_limited(oauth_server: RunningServer,
                                                                     issuer: Issuer) -> None:
    feedback_only = issuer.token(sub="fb", scope="chatforge.feedback")
    error = assert_openai_error(httpx.get(oauth_server.url + "/v1/models", headers=bearer(feedback_only)), 403,
                                "permission_error", "insufficient_scope")
    assert "'chat'" in error["message"]
    statuses = [httpx.post(oauth_server.url + CHAT, headers=bearer(issuer.token(sub="carol", jti=str(n))),
                           json={"messages": HELLO, "max_tokens": 1}).status_code for n in range(4)]
    assert statuses == [200, 200, 200, 429]  # serve.oauth.rpm = 3, whatever token carol presents
    other = httpx.post(oauth_server.url + CHAT, headers=bearer(issuer.token(sub="dave")),
                       json={"messages": HELLO, "max_tokens": 1})
    assert other.status_code == 200
    names = {key.name for key in oauth_server.store.list_keys()}
    assert {"oauth:carol", "oauth:dave"} <= names


def test_feedback_ownership_and_revocation_follow_the_identity(oauth_server: RunningServer, issuer: Issuer) -> None:
    erin, frank = issuer.token(sub="erin"), issuer.token(sub="frank")
    reply = httpx.post(oauth_server.url + CHAT, headers=bearer(erin), json={"messages": HELLO, "max_tokens": 2}).json()
    rate = {"completion_id": reply["id"], "rating": 1}
    assert_openai_error(httpx.post(oauth_server.url + "/v1/feedback", headers=bearer(frank), json=rate), 404,
                        "not_found_error")
    assert httpx.post(oauth_server.url + "/v1/feedback", headers=bearer(erin), json=rate).status_code == 200
    admin = oauth_server.new_key("oauth-admin", scopes=("admin",))
    erin_id = next(k.id for k in oauth_server.store.list_keys() if k.name == "oauth:erin")
    revoked = httpx.delete(f"{oauth_server.url}/v1/admin/keys/{erin_id}", headers=bearer(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert_openai_error(httpx.get(oauth_server.url + "/v1/models", headers=bearer(issuer.token(sub="erin"))), 401,
                        "authentication_error", "revoked_identity")


def test_a_rotated_key_is_fetched_on_its_first_token_once_the_refresh_interval_passed(issuer: Issuer,
                                                                                      jwks_url: str) -> None:
    clock = [1000.0]
    verifier = OAuthVerifier(OAuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_url, jwks_refresh_min_s=30,
                                         scope_map={"chatforge.chat": "chat"}), clock=lambda: clock[0])
    rotated = Issuer()

    async def scenario() -> None:
        assert (await verifier.verify(issuer.token())).subject == "alice"
        original_jwks = issuer.jwks
        issuer.jwks = lambda: {"keys": original_jwks()["keys"] + [  # type: ignore[method-assign]
            {**json.loads(RSAAlgorithm.to_jwk(rotated.rsa.public_key())), "kid": "rsa-2", "alg": "RS256"}]}
        try:
            new_token = jwt.encode(valid_claims(), rotated.rsa, algorithm="RS256", headers={"kid": "rsa-2"})
            clock[0] += 10
            with pytest.raises(OAuthError, match="not in the issuer's key set"):  # too soon to refetch
                await verifier.verify(new_token)
            clock[0] += 30
            assert (await verifier.verify(new_token)).scopes == frozenset({"chat"})
        finally:
            issuer.jwks = original_jwks  # type: ignore[method-assign]
            await verifier.close()

    asyncio.run(scenario())


def test_a_local_key_set_file_works_without_any_fetch(issuer: Issuer, tmp_path: Path) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(issuer.jwks()), encoding="utf-8")
    verifier = OAuthVerifier(OAuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=str(jwks_file),
                                         scope_map={"chatforge.chat": "chat"}, identity_claim="email"))
    identity = asyncio.run(verifier.verify(issuer.token("ES256", email="ana@example.test")))
    assert identity.subject == "ana@example.test" and identity.scopes == frozenset({"chat"})
    with pytest.raises(OAuthError, match="no usable 'email' claim"):
        asyncio.run(verifier.verify(issuer.token()))


def test_oauth_config_refuses_symmetric_algorithms_and_needs_one_key_source() -> None:
    for algorithms in (["HS256"], ["none"]):
        with pytest.raises(ValueError, match="algorithms"):
            OAuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url="http://x/certs", algorithms=algorithms)
    with pytest.raises(ValueError, match="exactly one of"):
        OAuthConfig(issuer=ISSUER, audience=AUDIENCE)
