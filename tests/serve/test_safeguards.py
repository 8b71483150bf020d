"""serve.safeguards over a real uvicorn app: blocked prompts, redacted and refused answers (whole and streamed), a
moderation API on loopback, linear-time patterns, and every action in /metrics and the log without the text."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from chatforge.config import ConfigError, ProjectConfig, ServeConfig
from chatforge.serve.app import create_app
from chatforge.serve.backends import GenerationInput, estimate_tokens
from chatforge.serve.engine import Delta
from chatforge.serve.safeguards import Safeguards
from chatforge.serve.store import Store
from tests.serve.conftest import running_server

CHAT = "/v1/chat/completions"
EMAIL, PHONE = "ana.lima@example.com", "+44 20 7946 0958"
PII_ANSWER = (f"Sure. Write to {EMAIL} or call {PHONE} any weekday; " + "the team answers within a day. " * 8).strip()
SECRET_ANSWER = "Here is the plan: " + "step by step, " * 10 + "then the launch codes are 0000 and " + "more " * 40


class ScriptedBackend:
    """A backend whose answer is fixed text, sent in 3-character pieces; notes how many pieces were taken."""

    model_id, context_length = "scripted", None

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.pieces_sent = 0

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def ready(self) -> bool: return True
    def queue_depth(self) -> int: return 0
    def count_tokens(self, job: GenerationInput) -> int: return estimate_tokens(job)

    async def stream(self, job: GenerationInput) -> AsyncIterator[Delta]:
        self.pieces_sent = 0
        pieces = [self.answer[i:i + 3] for i in range(0, len(self.answer), 3)]
        for piece in pieces:
            self.pieces_sent += 1
            yield Delta(piece)
        yield Delta("", "stop", 5, len(pieces))


class Gateway:
    def __init__(self, url: str, backend: ScriptedBackend, key: str, admin: str) -> None:
        self.url, self.backend, self.key, self.admin = url, backend, key, admin

    def chat(self, text: str, stream: bool = False, **extra: Any) -> httpx.Response:
        return httpx.post(self.url + CHAT, json={"messages": [{"role": "user", "content": text}], "stream": stream,
                                                 **extra},
                          headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def complete(self, prompt: str) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", json={"prompt": prompt},
                          headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def metric(self, stage: str, action: str) -> float:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {self.admin}"}).text
        prefix = f'chatforge_safeguard_actions_total{{action="{action}",stage="{stage}"}} '
        return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def gateway(tmp_path: Path, answer: str, **safeguards: Any) -> Iterator[Gateway]:
    cfg = ServeConfig(db=f"sqlite:///{tmp_path / 'gw.db'}", safeguards=safeguards)
    store, backend = Store(cfg.db), ScriptedBackend(answer)
    key = store.create_key("user", rpm=None, tpm=None)[0]
    admin = store.create_key("ops", ("admin",), rpm=None, tpm=None)[0]
    with running_server(create_app(cfg, store=store, backend=backend)) as url:
        yield Gateway(url, backend, key, admin)
    store.close()


def streamed(response: httpx.Response) -> tuple[list[str], str | None]:
    """(the content pieces, the finish reason) of an event stream."""
    pieces, finish = [], None
    for line in response.text.splitlines():
        if line.startswith("data: {") and json.loads(line[6:])["choices"]:  # not the usage chunk
            choice = json.loads(line[6:])["choices"][0]
            pieces += [choice["delta"]["content"]] if choice["delta"].get("content") else []
            finish = choice["finish_reason"] or finish
    return pieces, finish


@pytest.fixture
def pii_gateway(tmp_path: Path) -> Iterator[Gateway]:
    yield from gateway(tmp_path, PII_ANSWER, redact_output=True, blocklist=["launch codes"])


@pytest.fixture
def policy_gateway(tmp_path: Path) -> Iterator[Gateway]:
    yield from gateway(tmp_path, SECRET_ANSWER, blocklist=["launch codes", "Forbidden Plan"],
                       patterns=[r"\b\d{3}-\d{2}-\d{4}\b"], refusal="Sorry, no.")


def test_a_blocked_prompt_gets_an_openai_400_content_filter(policy_gateway: Gateway,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="chatforge.serve.safeguards"):
        for text, rule in (("tell me the forbidden  plan", None), ("tell me the FORBIDDEN PLAN", "blocklist"),
                           ("my number is 078-05-1120", "patterns[0]")):
            response = policy_gateway.chat(text)
            if rule is None:  # two spaces: not the listed phrase
                assert response.status_code == 200
                continue
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "content_filter"
            assert rule in error["message"] and text.split()[-1] not in error["message"]
    assert policy_gateway.metric("input", "blocked") == 2
    assert "FORBIDDEN" not in caplog.text and "078-05" not in caplog.text and "patterns[0]" in caplog.text


def test_pii_in_a_whole_answer_is_redacted(pii_gateway: Gateway) -> None:
    answer = pii_gateway.chat("how do I reach you?").json()
    content = answer["choices"][0]["message"]["content"]
    assert EMAIL not in content and PHONE not in content
    assert content.startswith("Sure. Write to [EMAIL] or call [PHONE] any weekday;")
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert pii_gateway.metric("output", "redacted") == 2


def test_pii_in_a_streamed_answer_is_redacted_and_the_answer_still_streams(pii_gateway: Gateway) -> None:
    whole = pii_gateway.chat("how do I reach you?").json()["choices"][0]["message"]["content"]
    pieces, finish = streamed(pii_gateway.chat("how do I reach you?", stream=True))
    assert "".join(pieces) == whole and finish == "stop"
    assert len(pieces) >= 20  # released as it comes, not held to the end (the answer has ~120 pieces of 3)
    assert all("ana" not in piece and "7946" not in piece for piece in pieces)
    assert pii_gateway.metric("output", "redacted") == 4


def test_text_completions_are_guarded_too(pii_gateway: Gateway) -> None:
    blocked = pii_gateway.complete("the launch codes are")
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_filter"
    text = pii_gateway.complete("contact:").json()["choices"][0]["text"]
    assert text.startswith("Sure. Write to [EMAIL] or call [PHONE]") and EMAIL not in text


def test_a_blocklisted_whole_answer_becomes_the_refusal(policy_gateway: Gateway) -> None:
    answer = policy_gateway.chat("what is the plan?").json()
    assert answer["choices"][0]["message"]["content"] == "Sorry, no."
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert policy_gateway.metric("output", "blocked") == 1


def test_a_blocklisted_stream_stops_before_the_match_and_ends_with_content_filter(policy_gateway: Gateway) -> None:
    response = policy_gateway.chat("what is the plan?", stream=True, stream_options={"include_usage": True})
    pieces, finish = streamed(response)
    text = "".join(pieces)
    usage = [json.loads(line[6:])["usage"] for line in response.text.splitlines()
             if line.startswith("data: {") and json.loads(line[6:]).get("usage")]
    assert usage and usage[-1]["prompt_tokens"] > 0 and usage[-1]["completion_tokens"] > 0
    assert finish == "content_filter" and text.endswith("Sorry, no.")
    assert "launch" not in text and text.startswith("Here is the plan: step by step,")  # sent up to the window
    assert policy_gateway.backend.pieces_sent < len(SECRET_ANSWER) // 3  # the generation was stopped
    assert policy_gateway.metric("output", "blocked") == 1


@pytest.fixture
def moderation_api() -> Iterator[dict[str, Any]]:
    """A fake OpenAI /v1/moderations on loopback: flags text with 'attack' (category violence); `state` toggles."""
    state: dict[str, Any] = {"url": "", "calls": 0, "down": False}
    app = FastAPI()

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> Any:
        state["calls"] += 1
        if state["down"]:
            return JSONResponse({"error": "down"}, status_code=500)
        text = (await request.json())["input"]
        flagged = "attack" in text
        return {"id": "modr-1", "model": "fake", "results": [{"flagged": flagged, "categories": {
            "violence": flagged, "hate": False}}]}

    with running_server(app) as url:
        state["url"] = url + "/v1/moderations"
        yield state


def test_the_moderation_api_blocks_flagged_prompts_and_answers(tmp_path: Path, moderation_api: dict[str, Any]) -> None:
    answer = "Fine, here goes: " + "we plan the attack at dawn. " * 30
    for running in gateway(tmp_path, answer, moderation_url=moderation_api["url"], moderation_chunk_chars=64):
        blocked = running.chat("plan an attack")
        assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_filter"
        assert "violence" in blocked.json()["error"]["message"]
        whole = running.chat("tell me a story").json()["choices"][0]
        assert whole["message"]["content"] == "I can't help with that." and whole["finish_reason"] == "content_filter"
        pieces, finish = streamed(running.chat("tell me a story", stream=True))
        assert finish == "content_filter" and "attack" not in "".join(pieces)
        assert running.metric("input", "blocked") == 1 and running.metric("output", "blocked") == 2
        moderation_api["down"] = True  # fail closed by default: no prompt passes unjudged
        down = running.chat("tell me a story")
        assert down.status_code == 503 and down.json()["error"]["code"] == "moderation_unavailable"
        assert running.metric("input", "moderation_error") == 1


def test_patterns_must_be_re2_and_run_in_linear_time(tmp_path: Path) -> None:
    config = tmp_path / "chatforge.yaml"
    config.write_text("serve:\n  safeguards:\n    patterns: ['ok', '(a+)\\1']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"serve\.safeguards\.patterns.*patterns\[1\].*not an RE2 expression"):
        ProjectConfig.load(config)
    nested = Safeguards(ServeConfig(safeguards={"patterns": [r"(a+)+$", r"(x|x)*y"]}))
    hostile = "a" * 100_000 + "!" + "x" * 100_000  # exponential for a backtracking engine
    started = time.perf_counter()
    assert nested.matching_rule(hostile) is None
    assert time.perf_counter() - started < 2.0
