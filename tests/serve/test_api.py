"""The API under uvicorn on loopback: the official openai client (streaming and not), auth (401/403), rate limits
(429), bad input (400/404/413), a full queue (503), metrics, feedback, access logs, disconnects and the upstream
gateway."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from chatforge.config import ServeConfig
from chatforge.models.run import LoadedRun
from chatforge.serve.app import create_app
from chatforge.serve.backends import GenerationInput
from chatforge.serve.engine import Delta
from chatforge.serve.store import Store
from chatforge.serve.upstream import UpstreamBackend
from tests.serve.conftest import RunningServer, gated, running_server, started_server

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "How do I reset my password?"}]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, status: int, error_type: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == error_type
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"]
    return error


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" ([0-9.e+-]+)"
    found = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def key(server: RunningServer) -> str:
    return server.new_key("api-tests")


def test_openai_client_chats_with_usage_and_lists_the_model(server: RunningServer, key: str) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list().data] == [server.model_id]
    reply = client.chat.completions.create(model=server.model_id, messages=HELLO, max_tokens=8, temperature=0.7,
                                           seed=3)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert 0 <= reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_streams_the_same_answer_it_gives_whole(server: RunningServer, key: str) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    settings = {"model": server.model_id, "messages": HELLO, "max_tokens": 12, "temperature": 0.0}
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_continues_the_raw_prompt(server: RunningServer, key: str,
                                                  served_model: LoadedRun) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    reply = client.completions.create(model=server.model_id, prompt="Hello there", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.usage.prompt_tokens == len(served_model.tokenizer("Hello there")["input_ids"])  # no chat template
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model_id, prompt="Hello there", max_tokens=5, temperature=0, stream=True))
    assert streamed == reply.choices[0].text


def test_missing_bad_or_revoked_keys_get_401(server: RunningServer) -> None:
    revoked = server.new_key("soon-revoked")
    server.store.revoke_key("soon-revoked")
    cases = {"missing_api_key": {}, "invalid_authorization_header": {"Authorization": "Basic abc"},
             "invalid_api_key": bearer("cf-k_00000000-" + "x" * 32)}
    for code, headers in cases.items():
        assert_openai_error(httpx.post(server.url + CHAT, json={"messages": HELLO}, headers=headers), 401,
                            "authentication_error", code)
    assert_openai_error(httpx.post(server.url + CHAT, json={"messages": HELLO}, headers=bearer(revoked)), 401,
                        "authentication_error", "invalid_api_key")
    assert_openai_error(httpx.get(server.url + "/v1/models"), 401, "authentication_error")


def test_keys_without_the_scope_get_403(server: RunningServer, key: str) -> None:
    feedback_only = server.new_key("feedback-only", scopes=("feedback",))
    error = assert_openai_error(httpx.post(server.url + CHAT, json={"messages": HELLO}, headers=bearer(feedback_only)),
                                403, "permission_error", "insufficient_scope")
    assert "'chat'" in error["message"]
    chat_only = server.new_key("chat-only", scopes=("chat",))
    assert_openai_error(httpx.post(server.url + "/v1/feedback", json={"completion_id": "x", "rating": 1},
                                   headers=bearer(chat_only)), 403, "permission_error")
    assert_openai_error(httpx.get(server.url + "/metrics", headers=bearer(key)), 403, "permission_error")


def test_rate_limits_answer_429_with_retry_after(server: RunningServer) -> None:
    one_a_minute = server.new_key("one-a-minute", rpm=1)
    body = {"messages": HELLO, "max_tokens": 2}
    assert httpx.post(server.url + CHAT, json=body, headers=bearer(one_a_minute)).status_code == 200
    second = httpx.post(server.url + CHAT, json=body, headers=bearer(one_a_minute))
    assert_openai_error(second, 429, "rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(second.headers["retry-after"]) <= 60
    few_tokens = bearer(server.new_key("few-tokens", tpm=40))  # the prompt alone is 19 tokens
    assert httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 10}, headers=few_tokens).is_success
    assert_openai_error(httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 20}, headers=few_tokens),
                        429, "rate_limit_error", "rate_limit_exceeded")


@pytest.mark.parametrize(("body", "param", "code"), [
    (b'{"messages": [', None, "invalid_json"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", None),
    ({"messages": []}, "messages", None),
    ({"messages": HELLO, "max_tokens": 5000}, "max_tokens", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "word " * 2100}]}, "messages", "context_length_exceeded"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", None),
    ({"messages": HELLO, "n": 2}, "n", None),
    ({"messages": HELLO, "temprature": 0.5}, "temprature", None),
])
def test_bad_requests_get_400_naming_the_field(server: RunningServer, key: str, body: object, param: str | None,
                                               code: str | None) -> None:
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.url + CHAT, headers={**bearer(key), "Content-Type": "application/json"}, **sent)
    error = assert_openai_error(response, 400, "invalid_request_error", code)
    assert error["param"] == param


def test_unknown_routes_and_models_get_404(server: RunningServer, key: str) -> None:
    assert_openai_error(httpx.get(server.url + "/v1/nothing", headers=bearer(key)), 404, "not_found_error")
    error = assert_openai_error(httpx.post(server.url + CHAT, json={"model": "gpt-9", "messages": HELLO},
                                           headers=bearer(key)), 404, "not_found_error", "model_not_found")
    assert server.model_id in error["message"]
    by_alias = httpx.post(server.url + CHAT, json={"model": "chatforge", "messages": HELLO, "max_tokens": 2},
                          headers=bearer(key))
    assert by_alias.status_code == 200 and by_alias.json()["model"] == server.model_id


def test_bodies_over_the_limit_get_413_even_when_chunked(server: RunningServer, key: str) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    assert_openai_error(httpx.post(server.url + CHAT, content=big, headers=bearer(key)), 413,
                        "invalid_request_error", "request_too_large")

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    assert_openai_error(httpx.post(server.url + CHAT, content=chunked(), headers=bearer(key)), 413,
                        "invalid_request_error", "request_too_large")


def test_health_ready_and_the_chat_page_need_no_key(server: RunningServer) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "model": server.model_id}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/feedback" in page.text


def test_metrics_move_with_requests_tokens_and_errors(server: RunningServer, key: str) -> None:
    admin = bearer(server.new_key("metrics-admin", scopes=("admin",)))
    before = httpx.get(server.url + "/metrics", headers=admin).text
    reply = httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 4}, headers=bearer(key)).json()
    httpx.post(server.url + CHAT, json={"messages": HELLO})  # 401
    after = httpx.get(server.url + "/metrics", headers=admin).text
    for status in ("200", "401"):
        count_before = metric(before, "chatforge_requests_total", route=CHAT, status=status)
        assert metric(after, "chatforge_requests_total", route=CHAT, status=status) == count_before + 1
    assert metric(after, "chatforge_errors_total", type="authentication_error") >= 1
    assert (metric(after, "chatforge_tokens_out_total") - metric(before, "chatforge_tokens_out_total")
            == reply["usage"]["completion_tokens"])
    assert (metric(after, "chatforge_tokens_in_total") - metric(before, "chatforge_tokens_in_total")
            == reply["usage"]["prompt_tokens"])
    assert metric(after, "chatforge_time_to_first_token_seconds_count", route=CHAT) > metric(
        before, "chatforge_time_to_first_token_seconds_count", route=CHAT)
    assert metric(after, "chatforge_batch_size_count") >= 1 and "chatforge_queue_depth 0.0" in after


def test_feedback_is_stored_for_a_completion_and_refused_when_not_stored(server: RunningServer, key: str) -> None:
    asked = [{"role": "user", "content": "Mail me at ana@example.com please"}]
    reply = httpx.post(server.url + CHAT, json={"messages": asked, "max_tokens": 4}, headers=bearer(key)).json()
    rated = httpx.post(server.url + "/v1/feedback", headers=bearer(key),
                       json={"completion_id": reply["id"], "rating": -1, "correction": "Sure, I will."})
    assert rated.status_code == 200 and rated.json()["completion_id"] == reply["id"]
    row = next(r for r in server.store.feedback_rows() if r["completion_id"] == reply["id"])
    assert row["rating"] == -1 and row["correction"] == "Sure, I will." and row["id"] == rated.json()["id"]
    assert "ana@example.com" not in json.dumps(row["messages"]) and "[EMAIL]" in json.dumps(row["messages"])
    unstored = httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 2, "store": False},
                          headers=bearer(key)).json()
    assert_openai_error(httpx.post(server.url + "/v1/feedback", headers=bearer(key),
                                   json={"completion_id": unstored["id"], "rating": 1}), 404, "not_found_error")
    assert_openai_error(httpx.post(server.url + "/v1/feedback", headers=bearer(key),
                                   json={"completion_id": reply["id"], "rating": 5}), 400, "invalid_request_error")


def test_requests_are_recorded_and_logged_as_json_without_keys_or_content(
    server: RunningServer, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_question = [{"role": "user", "content": "the launch code is swordfish"}]
    response = httpx.post(server.url + CHAT, json={"messages": secret_question, "max_tokens": 3},
                          headers={**bearer(key), "X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    httpx.post(server.url + CHAT, json={"messages": secret_question}, headers=bearer(key + "tampered"))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "chatforge.serve.access"]
    mine = next(line for line in lines if line["request_id"] == "trace-42")
    assert mine["status"] == 200 and mine["key_id"] and mine["route"] == CHAT and mine["tokens_in"] > 0
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert key not in everything and key[-20:] not in everything and "swordfish" not in everything
    record = next(r for r in server.store.requests(limit=20) if r.request_id == "trace-42")
    assert record.status == 200 and record.key_id == mine["key_id"] and record.tokens_in == mine["tokens_in"]
    assert record.latency_s > 0 and record.ttft_s is not None and record.ttft_s <= record.latency_s


class BrokenBackend:
    """A backend whose generation fails with a message that must not reach the client."""

    model_id, context_length = "broken", None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def queue_depth(self) -> int:
        return 0

    def count_tokens(self, job: GenerationInput) -> int:
        return 3

    async def stream(self, job: GenerationInput) -> AsyncIterator[Delta]:
        raise RuntimeError("boom: the upstream key is sk-live-4f9a8b7c6d5e4f3a2b1c")
        yield Delta("")


def test_an_unexpected_failure_is_a_500_that_leaks_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = ServeConfig(run="broken", db=f"sqlite:///{tmp_path}/db.sqlite")
    store = Store(cfg.db)
    key = store.create_key("victim")[0]
    with running_server(create_app(cfg, store=store, backend=BrokenBackend())) as url:
        for stream in (False, True):
            response = httpx.post(url + CHAT, json={"messages": HELLO, "stream": stream}, headers=bearer(key))
            error = assert_openai_error(response, 500, "server_error", "internal_error")
            assert response.headers["x-request-id"] in error["message"]
            assert "sk-live" not in response.text and "boom" not in response.text and "Traceback" not in response.text
    assert any("boom" in (r.exc_text or "") for r in caplog.records)  # the details are in the server log
    store.close()


@pytest.fixture(scope="module")
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture(scope="module")
def held_server(served_model: LoadedRun, serve_run: Path, tmp_path_factory: pytest.TempPathFactory,
                gate: threading.Event) -> Iterator[RunningServer]:
    """One request decodes at a time and one may wait; the model steps only while `gate` is set (slowly)."""
    slow = gated(served_model, gate, delay_s=0.01, stop_tokens=False)
    with started_server(slow, serve_run, tmp_path_factory.mktemp("held") / "db.sqlite", max_batch=1,
                        max_queue=1) as running:
        yield running
        gate.set()  # let anything still decoding finish, so the server stops at once


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after(held_server: RunningServer, gate: threading.Event) -> None:
    gate.clear()
    key = held_server.new_key("queue")
    engine = held_server.backend.engine
    assert engine is not None
    body = {"messages": HELLO, "max_tokens": 3}
    with ThreadPoolExecutor(2) as pool:
        decoding = pool.submit(httpx.post, held_server.url + CHAT, json=body, headers=bearer(key), timeout=30)
        wait_until(lambda: engine.stats.batches == 1)  # taken into a batch, stuck in its first step
        waiting = pool.submit(httpx.post, held_server.url + CHAT, json=body, headers=bearer(key), timeout=30)
        wait_until(lambda: engine.queue_depth == 1)
        refused = httpx.post(held_server.url + CHAT, json=body, headers=bearer(key))
        assert_openai_error(refused, 503, "service_unavailable", "overloaded")
        assert int(refused.headers["retry-after"]) >= 1
        gate.set()
        assert decoding.result().status_code == 200 and waiting.result().status_code == 200


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(held_server: RunningServer,
                                                                     gate: threading.Event) -> None:
    gate.set()
    key = held_server.new_key("leaver")
    engine = held_server.backend.engine
    assert engine is not None
    cancelled_before = engine.stats.cancelled
    body = {"messages": HELLO, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", held_server.url + CHAT, json=body, headers=bearer(key)) as response:
        data_lines = (line for line in response.iter_lines() if line.startswith("data:"))
        for _ in range(4):
            next(data_lines)
    wait_until(lambda: engine.stats.cancelled == cancelled_before + 1)
    assert engine.queue_depth == 0
    quick = httpx.post(held_server.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, headers=bearer(key))
    assert quick.status_code == 200  # the engine is free again: the abandoned row no longer decodes


def test_upstream_gateway_passes_answers_and_errors_through(server: RunningServer, key: str,
                                                            tmp_path: Path) -> None:
    cfg = ServeConfig(backend="upstream", upstream_url=f"{server.url}/v1", db=f"sqlite:///{tmp_path}/gw.db")
    gateway_store = Store(cfg.db)
    gateway_key = gateway_store.create_key("gw-user")[0]
    app = create_app(cfg, store=gateway_store, backend=UpstreamBackend(cfg, cfg.upstream_url or "", api_key=key))
    with running_server(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=gateway_key, max_retries=0)
        assert [m.id for m in client.models.list().data] == [server.model_id]
        direct = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model=server.model_id, messages=HELLO, max_tokens=10, temperature=0)
        through = client.chat.completions.create(model=server.model_id, messages=HELLO, max_tokens=10, temperature=0)
        assert through.choices[0].message.content == direct.choices[0].message.content
        assert through.usage.completion_tokens == direct.usage.completion_tokens
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=server.model_id, messages=HELLO, max_tokens=10, temperature=0, stream=True) if c.choices)
        assert streamed == direct.choices[0].message.content
        too_long = httpx.post(url + CHAT, json={"messages": HELLO, "max_tokens": 5000}, headers=bearer(gateway_key))
        assert_openai_error(too_long, 400, "invalid_request_error")
        rated = httpx.post(url + "/v1/feedback", json={"completion_id": through.id, "rating": 1},
                           headers=bearer(gateway_key))
        assert rated.status_code == 200  # the gateway keeps the conversation and the feedback itself
    assert {r.status for r in gateway_store.requests()} >= {200, 400}
    gateway_store.close()
