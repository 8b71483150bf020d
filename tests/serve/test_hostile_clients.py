"""Hostile clients, replayed against a real uvicorn on loopback (issue 13, fixes 2-7): feedback floods and unknown
completion ids, slow bodies and idle connections, wrong-secret floods, lone surrogates, upstream error bodies and
huge max_tokens, and the smaller ones (rate limit before tokenizing, strict ratings, key names with escapes,
security headers, the rating page's token, API docs off, checkpoints loaded as data only)."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from torch import nn
from typer.testing import CliRunner

from chatforge.cli import app as cli_app
from chatforge.config import ServeConfig
from chatforge.evaluate.rating_app import TOKEN_COOKIE, create_rating_app
from chatforge.evaluate.rating_store import RatingStore
from chatforge.models.run import LoadedRun
from chatforge.serve import keys
from chatforge.serve.app import create_app
from chatforge.serve.upstream import UpstreamBackend
from chatforge.serve.store import Store
from chatforge.train.checkpoints import load_checkpoint, save_checkpoint
from tests.serve.conftest import RunningServer, running_server, started_server
from tests.serve.test_api import assert_openai_error, bearer

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def hostile(served_model: LoadedRun, serve_run: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny run with short deadlines (1 s for headers and bodies) and a small feedback cap."""
    with started_server(served_model, serve_run, tmp_path_factory.mktemp("hostile") / "db.sqlite",
                        header_timeout_s=1.0, body_timeout_s=1.0, max_feedback_chars=2000,
                        feedback_threads=1) as running:
        yield running


def address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection; socket.timeout if it keeps it open."""
    sock.settimeout(timeout_s)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def timed_get(url: str) -> tuple[int, float]:
    started = time.monotonic()
    status = httpx.get(url, timeout=30).status_code
    return status, time.monotonic() - started


class CountingRedactor:
    """Wraps the store's redactor: counts calls, the most running at once, and can burn CPU per call."""

    def __init__(self, inner: Any, busy_s: float = 0.0) -> None:
        self.inner, self.busy_s = inner, busy_s
        self.calls = self.running = self.most_running = 0
        self.lock = threading.Lock()

    def redact(self, text: str) -> Any:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            end = time.perf_counter() + self.busy_s
            while time.perf_counter() < end:  # holds the GIL like a slow regex would
                pass
            return self.inner.redact(text)
        finally:
            with self.lock:
                self.running -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --- 2: feedback --------------------------------------------------------------------------------------------------
def test_feedback_for_an_unknown_or_foreign_completion_is_refused_before_any_redaction(
        hostile: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, stranger = hostile.new_key("fb-owner"), hostile.new_key("fb-stranger")
    reply = httpx.post(hostile.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, headers=bearer(owner)).json()
    counting = CountingRedactor(hostile.store._redactor)
    monkeypatch.setattr(hostile.store, "_redactor", counting)
    correction = "4111 " * 300
    for key, completion_id in ((owner, "chatcmpl-does-not-exist"), (stranger, reply["id"])):
        refused = httpx.post(hostile.url + "/v1/feedback", headers=bearer(key),
                             json={"completion_id": completion_id, "rating": -1, "correction": correction})
        assert_openai_error(refused, 404, "not_found_error", "completion_not_found")
    assert counting.calls == 0  # neither an unknown id nor another key's completion costs a redaction
    too_long = httpx.post(hostile.url + "/v1/feedback", headers=bearer(owner),
                          json={"completion_id": reply["id"], "rating": -1, "correction": "x" * 2001})
    assert assert_openai_error(too_long, 400, "invalid_request_error", "feedback_too_long")["param"] == "correction"
    assert counting.calls == 0


def test_slow_feedback_redactions_run_in_a_bounded_pool_and_health_and_chat_stay_fast(
        hostile: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    key = hostile.new_key("fb-flood")
    key_id = keys.key_id_of(key)
    for n in range(8):
        hostile.store.store_conversation(f"chatcmpl-flood-{n}", key_id, "tiny", HELLO, "Hello!")
    counting = CountingRedactor(hostile.store._redactor, busy_s=0.4)
    monkeypatch.setattr(hostile.store, "_redactor", counting)
    with ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(httpx.post, hostile.url + "/v1/feedback", headers=bearer(key), timeout=60,
                             json={"completion_id": f"chatcmpl-flood-{n}", "rating": -1, "correction": "better"})
                 for n in range(8)]
        time.sleep(0.2)
        health, health_s = timed_get(hostile.url + "/health")
        started = time.monotonic()
        chat = httpx.post(hostile.url + CHAT, headers=bearer(key), timeout=60,
                          json={"messages": HELLO, "max_tokens": 2, "store": False})
        chat_s = time.monotonic() - started
        assert all(f.result().status_code == 200 for f in flood)
    assert counting.calls == 8 and counting.most_running == 1  # serve.feedback_threads
    assert health == 200 and health_s < 3.0, health_s  # generous: the machine may be loaded
    assert chat.status_code == 200 and chat_s < 10.0, chat_s


# --- 3: slow bodies, idle connections, the connection cap ---------------------------------------------------------
def test_slow_bodies_get_408_and_their_connections_close_while_others_are_served(hostile: RunningServer) -> None:
    slow = []
    for _ in range(20):
        sock = socket.create_connection(address(hostile.url), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000\r\n\r\n{")
        slow.append(sock)
    started = time.monotonic()
    status, health_s = timed_get(hostile.url + "/health")
    assert status == 200 and health_s < 3.0
    try:
        answers = [read_until_closed(sock, 10) for sock in slow]
    finally:
        for sock in slow:
            sock.close()
    assert time.monotonic() - started < 10
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:200]


def test_connections_that_never_finish_their_headers_are_closed(hostile: RunningServer) -> None:
    with socket.create_connection(address(hostile.url), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        assert read_until_closed(sock, 10) == b""
        assert time.monotonic() - started < 5


def test_connections_over_the_cap_get_503_until_idle_ones_are_dropped(served_model: LoadedRun, serve_run: Path,
                                                                      tmp_path: Path) -> None:
    with started_server(served_model, serve_run, tmp_path / "db.sqlite", max_connections=4,
                        header_timeout_s=1.0) as capped:
        idle = [socket.create_connection(address(capped.url), timeout=10) for _ in range(4)]
        try:
            assert httpx.get(capped.url + "/health", timeout=10).status_code == 503
            for sock in idle:
                assert read_until_closed(sock, 10) == b""  # the header deadline frees their slots
        finally:
            for sock in idle:
                sock.close()
        assert httpx.get(capped.url + "/health", timeout=10).status_code == 200


# --- 4: wrong secrets ---------------------------------------------------------------------------------------------
def test_a_flood_of_wrong_secrets_runs_scrypt_a_bounded_number_of_times(
        served_model: LoadedRun, serve_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with started_server(served_model, serve_run, tmp_path / "db.sqlite", auth_failures_per_address=10) as guarded:
        valid = guarded.new_key("flooded", scopes=("chat",))
        assert httpx.get(guarded.url + "/v1/models", headers=bearer(valid)).status_code == 200
        key_id = keys.key_id_of(valid)
        hashes = []
        real_hash = keys.hash_secret
        monkeypatch.setattr(keys, "hash_secret", lambda secret, salt: hashes.append(1) or real_hash(secret, salt))
        wrong = f"cf-{key_id}-{secrets.token_urlsafe(24)}"
        for _ in range(5):  # the same wrong secret again and again: hashed once
            assert_openai_error(httpx.get(guarded.url + "/v1/models", headers=bearer(wrong)), 401,
                                "authentication_error")
        assert len(hashes) == 1
        flood = [f"cf-{key_id}-{secrets.token_urlsafe(24)}" for _ in range(60)]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda s: httpx.get(guarded.url + "/v1/models", headers=bearer(s),
                                                         timeout=30).status_code, flood))
            health, health_s = timed_get(guarded.url + "/health")
        assert set(statuses) <= {401, 429} and statuses.count(429) >= 50, statuses
        assert len(hashes) <= 10, len(hashes)  # serve.auth_failures_per_address, not one per request
        assert health == 200 and health_s < 3.0
        limited = httpx.get(guarded.url + "/v1/models", headers=bearer(flood[-1]))
        assert_openai_error(limited, 429, "rate_limit_error", "too_many_failed_authentications")
        assert int(limited.headers["retry-after"]) >= 1
        assert httpx.get(guarded.url + "/v1/models", headers=bearer(valid)).status_code == 200  # still works


# --- 5: lone surrogates -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("route", "body", "param"), [
    (CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}', "messages[0].content"),
    ("/v1/completions", b'{"prompt": "hi \\udfff there", "max_tokens": 2}', "prompt"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"], "max_tokens": 2}', "stop"),
    ("/v1/feedback", b'{"completion_id": "chatcmpl-x", "rating": 1, "comment": "\\udc80"}', "comment"),
])
def test_lone_surrogates_are_a_400_naming_the_field(hostile: RunningServer, route: str, body: bytes,
                                                     param: str) -> None:
    key = hostile.new_key(f"surrogates-{secrets.token_hex(3)}")
    response = httpx.post(hostile.url + route, content=body,
                          headers={**bearer(key), "Content-Type": "application/json"})
    error = assert_openai_error(response, 400, "invalid_request_error", "invalid_value")
    assert error["param"].startswith(param) and "surrogate" in error["message"]


# --- 6: upstream errors and max_tokens ----------------------------------------------------------------------------
UPSTREAM_TRACEBACK = ("Traceback (most recent call last):\n  File \"/srv/app.py\", line 3, in chat\n"
                      "psycopg.OperationalError: connection to postgresql://app:hunter2@db:5432/prod failed; "
                      "password=hunter2\n")


def fake_upstream(calls: list[dict[str, Any]]) -> Starlette:
    """An OpenAI-compatible server that fails the way a broken one does, depending on the user's message."""

    async def models(_request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "up-model", "object": "model"}]})

    async def chat(request: Request) -> Any:
        body = await request.json()
        calls.append(body)
        said = body["messages"][-1]["content"]
        if said == "crash":
            return PlainTextResponse(UPSTREAM_TRACEBACK, 500)
        if said == "refuse":
            return PlainTextResponse("Bad Request\n" + UPSTREAM_TRACEBACK, 400)
        return JSONResponse({"error": {"message": "this model does not take that many stop words",
                                       "type": "invalid_request_error", "code": "too_many_stops"}}, 400)

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])


def test_upstream_errors_are_sanitised_and_huge_max_tokens_never_leave(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    calls: list[dict[str, Any]] = []
    with running_server(fake_upstream(calls)) as upstream_url:
        cfg = ServeConfig(backend="upstream", upstream_url=f"{upstream_url}/v1", db=f"sqlite:///{tmp_path}/gw.db",
                          max_tokens_limit=4096)
        store = Store(cfg.db)
        key = store.create_key("gw")[0]
        with running_server(create_app(cfg, store=store, backend=UpstreamBackend(cfg, cfg.upstream_url or ""))) \
                as url, caplog.at_level(logging.WARNING, logger="chatforge.serve.errors"):
            for stream in (False, True):
                crashed = httpx.post(url + CHAT, headers=bearer(key), timeout=30,
                                     json={"messages": [{"role": "user", "content": "crash"}], "stream": stream})
                error = assert_openai_error(crashed, 502, "upstream_error", "upstream_error")
                assert crashed.headers["x-request-id"] in error["message"]
                for leak in ("hunter2", "Traceback", "psycopg", "postgresql://"):
                    assert leak not in crashed.text
            refused = httpx.post(url + CHAT, headers=bearer(key), json={"messages": [{"role": "user",
                                                                                      "content": "refuse"}]})
            error = assert_openai_error(refused, 400, "invalid_request_error")
            assert "hunter2" not in refused.text and "Traceback" not in refused.text
            polite = httpx.post(url + CHAT, headers=bearer(key), json={"messages": HELLO})
            error = assert_openai_error(polite, 400, "invalid_request_error", "too_many_stops")
            assert error["message"] == "upstream: this model does not take that many stop words"
            forwarded = len(calls)
            for max_tokens in (10**9, 4097):
                huge = httpx.post(url + CHAT, headers=bearer(key), json={"messages": HELLO, "max_tokens": max_tokens})
                assert assert_openai_error(huge, 400, "invalid_request_error")["param"] == "max_tokens"
            float_tokens = httpx.post(url + CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}], '
                                      b'"max_tokens": 1e9}',
                                      headers={**bearer(key), "Content-Type": "application/json"})
            assert_openai_error(float_tokens, 400, "invalid_request_error")
            assert len(calls) == forwarded  # none of them reached the upstream
        store.close()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "OperationalError" in logged and "hunter2" not in logged  # the details stay in the log, masked


# --- 7: the smaller ones ------------------------------------------------------------------------------------------
def test_a_key_over_its_rate_limit_gets_429_before_any_tokenizing(hostile: RunningServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    key = hostile.new_key("limited", rpm=1)
    assert httpx.post(hostile.url + CHAT, headers=bearer(key), json={"messages": HELLO, "max_tokens": 2}
                      ).status_code == 200
    tokenized = []
    real_count = hostile.backend.count_tokens
    monkeypatch.setattr(hostile.backend, "count_tokens", lambda job: tokenized.append(1) or real_count(job))
    too_big = [{"role": "user", "content": "word " * 10000}]  # far over the tiny model's context
    limited = httpx.post(hostile.url + CHAT, headers=bearer(key), json={"messages": too_big})
    assert_openai_error(limited, 429, "rate_limit_error", "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) >= 1 and tokenized == []


def test_feedback_takes_only_real_ratings_once_per_key(hostile: RunningServer) -> None:
    key = hostile.new_key("rater")
    reply = httpx.post(hostile.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, headers=bearer(key)).json()
    for rating in (True, "1", 1.0, 0, 2):
        refused = httpx.post(hostile.url + "/v1/feedback", headers=bearer(key),
                             json={"completion_id": reply["id"], "rating": rating})
        assert assert_openai_error(refused, 400, "invalid_request_error")["param"] == "rating"
    first = httpx.post(hostile.url + "/v1/feedback", headers=bearer(key),
                       json={"completion_id": reply["id"], "rating": 1}).json()
    again = httpx.post(hostile.url + "/v1/feedback", headers=bearer(key),
                       json={"completion_id": reply["id"], "rating": -1, "correction": "Hello there."}).json()
    rows = [r for r in hostile.store.feedback_rows() if r["completion_id"] == reply["id"]]
    assert first["id"] == again["id"] and [(r["rating"], r["correction"]) for r in rows] == [(-1, "Hello there.")]


def test_key_names_with_control_characters_are_refused_and_listed_escaped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"
    with Store(url) as store:
        for name in ("evil\x1b]0;pwned\x07", "bell\x07", "new\nline", "oauth:alice", "x" * 101):
            with pytest.raises(ValueError, match="name"):
                store.create_key(name)
        _, legacy = store.create_key("legacy")
        with store._engine.begin() as connection:  # a row written before names were checked
            connection.exec_driver_sql("UPDATE api_keys SET name = ? WHERE id = ?", ("old\x1b[2Jname", legacy.id))
    listed = CliRunner().invoke(cli_app, ["keys", "list", "--db", url], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "\x1b" not in listed.output and "\\x1b" in listed.output


def test_every_page_and_answer_carries_security_headers(hostile: RunningServer) -> None:
    page = httpx.get(hostile.url + "/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    for response in (page, httpx.get(hostile.url + "/health"), httpx.get(hostile.url + "/nowhere"),
                     httpx.post(hostile.url + CHAT, json={"messages": HELLO})):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "content-security-policy" in response.headers


def test_api_docs_are_off_unless_configured(hostile: RunningServer, served_model: LoadedRun, serve_run: Path,
                                            tmp_path: Path) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(hostile.url + path).status_code == 404
    with started_server(served_model, serve_run, tmp_path / "db.sqlite", api_docs=True) as documented:
        assert httpx.get(documented.url + "/openapi.json").json()["paths"]["/v1/admin/keys"]
        assert httpx.get(documented.url + "/docs").status_code == 200


def test_the_rating_page_needs_its_token_and_sends_security_headers(tmp_path: Path) -> None:
    store = RatingStore(f"sqlite:///{tmp_path}/rating.db")
    study = store.create_study("runs/a", "runs/b", "data", "test")
    store.add_items(study.id, [("r1", [{"role": "user", "content": "hi"}], "Hello!", "Hi.")])
    with running_server(create_rating_app(store, study.id, access_token="t0ken")) as url:
        for path in ("/", "/api/next?rater=ana", "/?token=wrong"):
            refused = httpx.get(url + path)
            assert refused.status_code == 401 and refused.headers["x-frame-options"] == "DENY"
        page = httpx.get(url + "/?token=t0ken")
        assert page.status_code == 200 and "script-src 'sha256-" in page.headers["content-security-policy"]
        assert f"{TOKEN_COOKIE}=t0ken" in page.headers["set-cookie"] and "HttpOnly" in page.headers["set-cookie"]
        assert httpx.get(url + "/api/next?rater=ana", cookies={TOKEN_COOKIE: "t0ken"}).json()["item_id"]
        assert httpx.get(url + "/api/next?rater=ana", headers=bearer("t0ken")).status_code == 200
    store.close()


class PlantsAFile:
    """A pickle that, when loaded as code, creates `marker` (what a crafted checkpoint could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Path.touch, (self.marker,)


def test_checkpoints_load_as_data_only(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, scheduler, {"loss": 1.0}, keep=1)
    assert load_checkpoint(folder, model, optimizer, scheduler)["step"] == 1  # an honest checkpoint loads
    marker = tmp_path / "planted"
    torch.save({"state": PlantsAFile(marker)}, folder / "optimizer.pt")
    with pytest.raises(Exception, match="(?i)weights only"):
        load_checkpoint(folder, model, optimizer, scheduler)
    assert not marker.exists()

