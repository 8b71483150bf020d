"""The API's sampling fields: OpenAI's penalties (and the repetition_penalty extension) are accepted in their
ranges, refused outside them with the field named, and reach the decoder; a vanishing temperature answers."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from chatforge.serve.schemas import ChatCompletionRequest
from tests.serve.conftest import RunningServer

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "My router light is red."}]


def test_penalties_are_validated_in_openai_ranges() -> None:
    body = ChatCompletionRequest.model_validate({"messages": HELLO, "frequency_penalty": -2, "presence_penalty": 2,
                                                 "repetition_penalty": 1.3})
    assert body.penalties() == {"frequency_penalty": -2.0, "presence_penalty": 2.0, "repetition_penalty": 1.3}
    for field, value in [("frequency_penalty", 2.5), ("presence_penalty", -3), ("repetition_penalty", 0)]:
        with pytest.raises(ValidationError, match=field):
            ChatCompletionRequest.model_validate({"messages": HELLO, field: value})


def test_penalties_reach_the_decoder_and_tiny_temperatures_answer(server: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {server.new_key('sampling')}"}

    def answer(**fields: float) -> httpx.Response:
        return httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 12, "temperature": 0, **fields},
                          headers=headers, timeout=60)

    plain, penalised = answer(), answer(frequency_penalty=2, presence_penalty=2, repetition_penalty=3)
    assert plain.status_code == penalised.status_code == 200
    plain_text = plain.json()["choices"][0]["message"]["content"]
    assert plain_text != penalised.json()["choices"][0]["message"]["content"]
    tiny = answer(temperature=1e-300)  # used to fail every request decoding with it
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"]["content"] == plain_text
    refused = answer(frequency_penalty=3)
    assert refused.status_code == 400 and "frequency_penalty" in refused.text
