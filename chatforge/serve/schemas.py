"""The OpenAI wire format `chatforge serve` speaks: pydantic models for every request and response body.

Use it like this::

    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 32, "temperature": 0.7})
    request.plain_messages()         # [{"role": "user", "content": "hi"}]: what the chat template and store take
    request.stop_strings()           # stop as a list, whatever form the client sent
    error_body("messages is empty", "invalid_request_error", param="messages")   # OpenAI's {"error": {...}}

Requests accept what the official `openai` client sends (and `developer` as another name for `system`, a list of
text parts as content) and refuse the rest with a message naming the field: an unknown field, a role other than
system/user/assistant, an empty message list, n > 1, or a penalty out of range is a 400, never ignored.
Types are strict where JSON can blur them (`true` is not 1, `1e9` is not an integer), and text with a lone UTF-16
surrogate (`"\ud800"`, valid JSON but not Unicode text) is a 400 naming the field.
Responses are built as plain dicts on the hot path (a chunk per token); the models below document their shape
in the OpenAPI schema (`/openapi.json`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

MAX_STOP_STRINGS = 4


def _no_lone_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone UTF-16 surrogate ({text[exc.start]!a}) at character {exc.start}; "
                         "send valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
"""A request string that is valid Unicode (lone surrogates in JSON escapes are refused)."""


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(StrictBody):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def plain(self) -> dict[str, str]:
        """{"role", "content"} with text parts joined and `developer` read as `system`."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(StrictBody):
    include_usage: StrictBool = False


class SamplingFields(StrictBody):
    """What both completion routes share: sampling, streaming, storage opt-out."""

    model: Text | None = Field(default=None, description="the served model's id (GET /v1/models) or 'chatforge'; "
                                                      "optional")
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="default: serve.default_max_tokens")
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0, description="0 decodes greedily")
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(default=None,
                                         description=f"up to {MAX_STOP_STRINGS} strings that end the answer")
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    n: StrictInt = Field(default=1, description="only 1 is supported")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, description="accepted for compatibility; not stored")
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0, description="subtracted from the logit of "
                                          "every token already in the answer (OpenAI)")
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0, description="subtracted once per earlier "
                                           "occurrence in the answer (OpenAI)")
    repetition_penalty: StrictFloat = Field(default=1.0, gt=0.0, le=10.0, description="extension (transformers, "
                                            "vLLM): logits of tokens in the prompt or answer divided by it (> 1 "
                                            "repeats less)")

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported; send n=1 (or leave it out) and repeat the request for more")
        return n

    @field_validator("stop")
    @classmethod
    def _few_nonempty_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(s == "" for s in stops):
            raise ValueError("an empty stop string would end every answer at once; remove it")
        return stop

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def penalties(self) -> dict[str, float]:
        """The penalty fields as `SamplingSettings` takes them."""
        return {"frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                "repetition_penalty": self.repetition_penalty}


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. `store: false` keeps this conversation out of the feedback store."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, description="newer name of max_tokens")
    store: StrictBool | None = Field(default=None, description="false: do not keep this conversation for feedback")

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages is empty; send at least one user message")
        return messages

    def plain_messages(self) -> list[dict[str, str]]:
        return [message.plain() for message in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    """POST /v1/completions: raw text continued as is (no chat template)."""

    prompt: Text | list[Text]
    echo: StrictBool = Field(default=False, description="only false is supported")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"{len(prompt)} prompts in one request; send one prompt per request")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported; leave it out")
        return echo

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class FeedbackRequest(StrictBody):
    """POST /v1/feedback: a rating of one stored completion, maybe with the answer it should have given."""

    completion_id: Text = Field(min_length=1, max_length=100)
    rating: StrictInt = Field(description="1 (thumbs up) or -1 (thumbs down); `true` is not a rating",
                              json_schema_extra={"enum": [1, -1]})
    correction: Text | None = Field(default=None, description="the answer the model should have given "
                                                              "(at most serve.max_feedback_chars)")
    comment: Text | None = Field(default=None, description="at most serve.max_feedback_chars")

    @field_validator("rating")
    @classmethod
    def _thumbs(cls, rating: int) -> int:
        if rating not in (1, -1):
            raise ValueError(f"rating must be 1 (thumbs up) or -1 (thumbs down), got {rating}")
        return rating


class FeedbackResponse(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    completion_id: str
    rating: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
