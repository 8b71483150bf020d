"""Output safeguards: blocklist and RE2 patterns on prompts and answers, PII redaction of answers, a moderation API.

Configure them in chatforge.yaml::

    serve:
      safeguards:
        redact_output: true                      # emails, phones, cards... in answers -> [EMAIL], [PHONE], ...
        blocklist: ["make a bomb"]               # case-insensitive whole words/phrases
        patterns: ['\\b\\d{3}-\\d{2}-\\d{4}\\b']     # RE2 syntax: linear time, no backreferences or lookaround
        moderation_url: http://mod:8000/v1/moderations   # optional, OpenAI-compatible; key in $CHATFORGE_MODERATION_API_KEY

and the routes call them (app.py builds one `Safeguards` per app)::

    await safeguards.check_input(job, request_id)           # ContentBlocked -> 400, code content_filter
    async for delta in safeguards.guard_output(backend.stream(job), job, request_id): ...

A blocked prompt is an OpenAI-style 400 (`invalid_request_error`, code `content_filter`). A blocked answer ends
with the refusal text (`serve.safeguards.refusal`) and `finish_reason: "content_filter"`, and its generation stops.
A whole (non-streamed) answer is checked in full, so a blocked one is the refusal alone. A stream holds back only
`stream_window_chars` characters (at least the longest blocklist entry): a match, or PII, that ends in the next
tokens is caught before any of it is sent; text further back has gone out. With a moderation URL, a stream is
released in pieces of `moderation_chunk_chars`, each moderated before it is sent. Every action is counted in
/metrics (`chatforge_safeguard_actions_total{stage, action}`) and logged to `chatforge.serve.safeguards` with the
request id and the rule (`blocklist`, `patterns[2]`, `moderation:violence`), never the text.

User patterns are compiled with RE2 (google-re2), which matches in time linear in the text and refuses
backreferences and lookaround at config load, so no pattern can make a request take super-linear time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import re2

from chatforge.config import SafeguardsConfig, ServeConfig
from chatforge.core.pii import Redactor
from chatforge.serve.backends import BackendRejected, GenerationInput, estimate_tokens
from chatforge.serve.engine import Delta, ServeUnavailable
from chatforge.serve.metrics import ServeMetrics

MODERATION_KEY_ENV = "CHATFORGE_MODERATION_API_KEY"
CONTENT_FILTER = "content_filter"
log = logging.getLogger("chatforge.serve.safeguards")


class ContentBlocked(BackendRejected):
    """A prompt the safeguards refuse: HTTP 400, code content_filter (the message names the rule, not the text)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message, CONTENT_FILTER)


class Safeguards:
    """The checks `serve.safeguards` configures (see the module docstring); with nothing configured, a no-op."""

    def __init__(self, cfg: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.cfg: SafeguardsConfig = cfg.safeguards
        self.metrics = metrics
        self.redactor = Redactor.from_config(cfg.pii) if self.cfg.redact_output else None
        self.rules = _compiled_rules(self.cfg.blocklist, self.cfg.patterns)
        self.window = max([self.cfg.stream_window_chars, *(len(word) for word in self.cfg.blocklist)])

    # --- input --------------------------------------------------------------------------------------------------

    async def check_input(self, job: GenerationInput, request_id: str) -> None:
        """Raise ContentBlocked when a message (or the prompt) matches a rule or the moderation API flags it."""
        texts = [m["content"] for m in job.messages] if job.messages is not None else [job.prompt or ""]
        if "input" in self.cfg.check:
            for text in texts:
                rule = self.matching_rule(text)
                if rule is not None:
                    self._note("input", "blocked", request_id, rule)
                    raise ContentBlocked(f"the request was blocked by the content policy (rule {rule})")
        if self.cfg.moderation_url:
            flagged = await self.moderate("\n\n".join(texts), "input", request_id)
            if flagged is not None:
                self._note("input", "blocked", request_id, flagged)
                raise ContentBlocked(f"the request was blocked by the content policy (rule {flagged})")

    def matching_rule(self, text: str) -> str | None:
        """The name of the first rule that matches `text` (`blocklist`, `patterns[i]`), or None; linear time."""
        for name, rule in self.rules:
            if rule.search(text) is not None:
                return name
        return None

    async def moderate(self, text: str, stage: str, request_id: str) -> str | None:
        """'moderation:<categories>' when the moderation API flags `text`, else None; its failures follow
        moderation_fail_open (counted as moderation_error either way)."""
        assert self.cfg.moderation_url is not None
        key = os.environ.get(MODERATION_KEY_ENV)
        payload: dict[str, Any] = {"input": text}
        if self.cfg.moderation_model:
            payload["model"] = self.cfg.moderation_model
        try:
            async with httpx.AsyncClient(timeout=self.cfg.moderation_timeout_s) as client:
                response = await client.post(self.cfg.moderation_url, json=payload,
                                             headers={"Authorization": f"Bearer {key}"} if key else {})
            response.raise_for_status()
            results = response.json()["results"]
            flagged = [result for result in results if result.get("flagged")]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._note(stage, "moderation_error", request_id, type(exc).__name__)
            if self.cfg.moderation_fail_open:
                return None
            if stage == "input":
                raise ServeUnavailable("the moderation service does not answer; retry shortly", 5.0,
                                       "moderation_unavailable") from None
            return "moderation:unavailable"
        if not flagged:
            return None
        categories = sorted({name for result in flagged for name, hit in (result.get("categories") or {}).items()
                             if hit is True})
        return "moderation:" + (",".join(categories) or "flagged")

    # --- output -------------------------------------------------------------------------------------------------

    def guard_output(self, deltas: AsyncIterator[Delta], job: GenerationInput,
                     request_id: str) -> AsyncIterator[Delta]:
        """`deltas` with the output checks applied (unchanged when none is configured)."""
        checks_output = (self.redactor is not None or self.cfg.moderation_url is not None
                         or (self.rules and "output" in self.cfg.check))
        if not checks_output:
            return deltas
        return self._guarded(deltas, job, request_id)

    async def _guarded(self, deltas: AsyncIterator[Delta], job: GenerationInput,
                       request_id: str) -> AsyncIterator[Delta]:
        pending, released_tail, pieces = "", "", 0
        prompt_tokens = len(job.prompt_ids) if job.prompt_ids else estimate_tokens(job)  # for a refusal's usage
        try:
            async for delta in deltas:
                pending += delta.text
                pieces += 1 if delta.text else 0
                if delta.finish_reason is not None:
                    verdict = await self._output_verdict(released_tail + pending, request_id)
                    if verdict is not None:
                        yield self._refusal(verdict, request_id, delta.prompt_tokens, delta.completion_tokens)
                        return
                    yield Delta(await self._redacted_whole(pending, request_id), delta.finish_reason,
                                delta.prompt_tokens, delta.completion_tokens)
                    return
                if job.whole:
                    continue
                verdict = self.matching_rule(released_tail + pending) if "output" in self.cfg.check else None
                if verdict is not None:
                    yield self._refusal(verdict, request_id, prompt_tokens, pieces)
                    return
                cut = len(pending) - self.window
                if self.cfg.moderation_url and cut < self.cfg.moderation_chunk_chars:
                    continue
                if cut <= 0:
                    continue
                if self.cfg.moderation_url:
                    flagged = await self.moderate(released_tail + pending[:cut], "output", request_id)
                    if flagged is not None:
                        yield self._refusal(flagged, request_id, prompt_tokens, pieces)
                        return
                released = self._release(pending, cut, request_id)
                if released is not None:
                    text, cut = released
                    released_tail = (released_tail + pending[:cut])[-self.window:]
                    pending = pending[cut:]
                    if text:
                        yield Delta(text)
        finally:
            await deltas.aclose()  # a refusal stops the generation

    async def _output_verdict(self, text: str, request_id: str) -> str | None:
        rule = self.matching_rule(text) if "output" in self.cfg.check else None
        if rule is None and self.cfg.moderation_url:
            rule = await self.moderate(text, "output", request_id)
        return rule

    def _refusal(self, rule: str, request_id: str, prompt_tokens: int, completion_tokens: int) -> Delta:
        self._note("output", "blocked", request_id, rule)
        return Delta(self.cfg.refusal, CONTENT_FILTER, prompt_tokens, completion_tokens)

    async def _redacted_whole(self, text: str, request_id: str) -> str:
        if self.redactor is None or not text:
            return text
        redacted, counts = await asyncio.to_thread(self.redactor.redact, text)  # a long answer: off the loop
        self._count_redactions(counts.total(), request_id)
        return redacted

    def _release(self, pending: str, cut: int, request_id: str) -> tuple[str, int] | None:
        """(the redacted text of pending[:cut'], cut') for a cut' <= cut that no PII span crosses, or None (hold).

        A cut is safe when redacting the two sides apart gives what redacting the whole pending text gives (no
        span crosses it, and no shorter match ends at it). When nothing fits and the held text is 8 windows long,
        it goes out as it is redacted (bounded memory).
        """
        if self.redactor is None:
            return pending[:cut], cut
        whole, _ = self.redactor.redact(pending)
        space = pending.rfind(" ", 0, cut)
        for candidate in dict.fromkeys([cut, space, pending.rfind(" ", 0, max(0, space))]):
            if candidate <= 0:
                continue
            prefix, counts = self.redactor.redact(pending[:candidate])
            if whole == prefix + self.redactor.redact(pending[candidate:])[0] or len(pending) > 8 * self.window:
                self._count_redactions(counts.total(), request_id)
                return prefix, candidate
        return None

    def _count_redactions(self, hits: int, request_id: str) -> None:
        if hits:
            self._note("output", "redacted", request_id, f"pii x{hits}", hits)

    def _note(self, stage: str, action: str, request_id: str, rule: str, times: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.safeguard_actions.labels(stage=stage, action=action).inc(times)
        log.info(json.dumps({"request_id": request_id, "stage": stage, "action": action, "rule": rule}))


def _compiled_rules(blocklist: list[str], patterns: list[str]) -> list[tuple[str, Any]]:
    """[(rule name, RE2 regex)]: the blocklist as one case-insensitive whole-word alternation, then each pattern."""
    rules: list[tuple[str, Any]] = []
    if blocklist:
        alternatives = []
        for word in (word.strip() for word in blocklist):
            start = r"\b" if word[0].isalnum() or word[0] == "_" else ""
            end = r"\b" if word[-1].isalnum() or word[-1] == "_" else ""
            alternatives.append(start + re2.escape(word) + end)
        rules.append(("blocklist", re2.compile("(?i)(?:" + "|".join(alternatives) + ")")))
    rules += [(f"patterns[{position}]", re2.compile(pattern)) for position, pattern in enumerate(patterns)]
    return rules
