"""The upstream backend's routing and health checks, against small fake OpenAI servers on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from chatforge.config import ServeConfig
from chatforge.models.generate import SamplingSettings
from chatforge.serve.backends import BackendRejected, GenerationInput, collect, make_backend
from chatforge.serve.upstream import UpstreamBackend
from tests.serve.conftest import running_server


def fake_upstream(name: str, state: dict[str, Any]) -> FastAPI:
    """Answers '<name>' to every chat; GET /models fails while state['down']; chats fail with state['status']."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> Any:
        if state.get("down"):
            return JSONResponse({"error": {"message": "warming up"}}, status_code=503)
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> Any:
        state["served"] = state.get("served", 0) + 1
        if state.get("status"):
            return JSONResponse({"error": {"message": "boom"}}, status_code=state["status"])

        async def events() -> AsyncIterator[str]:
            for chunk in ({"choices": [{"delta": {"content": name}, "finish_reason": None}]},
                          {"choices": [{"delta": {}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 1}}):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def fakes() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    with ExitStack() as stack:
        states: list[dict[str, Any]] = [{}, {}]
        yield [(stack.enter_context(running_server(fake_upstream(name, state))) + "/v1", state)
               for name, state in zip(("A", "B"), states)]


def job() -> GenerationInput:
    return GenerationInput(SamplingSettings(max_new_tokens=4), messages=[{"role": "user", "content": "hi"}])


def test_the_least_busy_healthy_upstream_is_picked_and_ties_take_turns() -> None:
    backend = UpstreamBackend(ServeConfig(), ["http://a/v1", "http://b/v1", "http://c/v1"])
    a, b, c = backend.upstreams
    for upstream in backend.upstreams:
        upstream.healthy = True
    a.inflight, b.inflight, c.inflight = 3, 1, 2
    assert backend.pick(set()) is b
    assert backend.pick({b}) is c
    b.healthy = False
    assert backend.pick(set()) is c  # a down upstream is skipped...
    assert backend.pick({a, c}) is b  # ...unless every healthy one has been tried
    assert backend.pick({a, b, c}) is None
    a.inflight = b.inflight = c.inflight = 0
    b.healthy = True
    assert {backend.pick(set()).base_url for _ in range(6)} == {"http://a/v1", "http://b/v1", "http://c/v1"}


def test_health_checks_take_a_failing_upstream_out_and_bring_it_back(
        fakes: list[tuple[str, dict[str, Any]]]) -> None:
    (url_a, _), (url_b, state_b) = fakes
    cfg = ServeConfig(backend="upstream", upstreams=[url_a], upstream_url=url_b, upstream_health_s=0.1)

    async def scenario() -> None:
        backend = make_backend(cfg)  # serve.upstreams and serve.upstream_url together
        assert isinstance(backend, UpstreamBackend) and len(backend.upstreams) == 2
        await backend.start()
        try:
            assert backend.model_id == "fake-model"
            answers = {(await collect(backend.stream(job()))).text for _ in range(4)}
            assert answers == {"A", "B"}
            state_b["down"] = True
            await asyncio.sleep(0.5)
            assert not backend.upstreams[1].healthy and backend.ready()
            assert {(await collect(backend.stream(job()))).text for _ in range(4)} == {"A"}
            state_b["down"] = False
            await asyncio.sleep(0.5)
            assert backend.upstreams[1].healthy
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_an_upstream_5xx_is_retried_elsewhere_and_a_4xx_is_not(fakes: list[tuple[str, dict[str, Any]]]) -> None:
    (url_a, state_a), (url_b, state_b) = fakes

    async def scenario() -> None:
        backend = UpstreamBackend(ServeConfig(upstream_health_s=60), [url_a, url_b])
        await backend.start()
        try:
            state_a["status"] = 500
            assert {(await collect(backend.stream(job()))).text for _ in range(4)} == {"B"}
            assert backend.outcomes["retried"] >= 1 and backend.outcomes["failed"] == 0
            state_a["status"] = state_b["status"] = 400
            served = state_a["served"] + state_b["served"]
            with pytest.raises(BackendRejected) as refused:
                await collect(backend.stream(job()))
            assert refused.value.status == 400
            assert state_a["served"] + state_b["served"] == served + 1  # the client's own error: asked once
        finally:
            await backend.close()

    asyncio.run(scenario())
