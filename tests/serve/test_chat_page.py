"""The chat page in headless Chromium against the real server: enter a key, ask, watch the answer stream in, rate
it, and find the rating in the store; a bad key shows a readable 401. The page runs under its Content-Security-
Policy (a violation would be a console error), so waits use locators, not evaluated strings."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from chatforge.config import PiiConfig
from chatforge.core.pii import Redactor
from tests.browser import chromium_page
from tests.serve.conftest import RunningServer


def test_chat_page_streams_an_answer_and_saves_a_thumbs_up(server: RunningServer) -> None:
    key = server.new_key("page-user")
    with chromium_page() as (page, console_errors):
        page.goto(server.url + "/")
        page.fill("#key", key)
        page.click("#save-key")
        expect(page.locator("#model")).to_contain_text(server.model_id)
        page.evaluate("""() => {  // count the answer's text updates: one per streamed piece
            window.answerUpdates = 0;
            new MutationObserver((records) => {
                window.answerUpdates += records.filter((r) => r.target.classList?.contains("answer")).length;
            }).observe(document.getElementById("log"), {childList: true, subtree: true});
        }""")
        page.fill("#message", "How do I reset my password?")
        page.click("#send")
        answer = page.locator(".turn.assistant .answer").first
        page.wait_for_selector(".turn.assistant .thumbs-up", timeout=30_000)  # shown once the stream has ended
        streamed = answer.evaluate("node => node.textContent")
        assert streamed.strip(), "the streamed answer is empty"
        assert page.evaluate("window.answerUpdates") > 1  # it grew piece by piece, not all at once
        completion_id = page.locator(".turn.assistant").first.get_attribute("data-completion-id")
        assert completion_id and completion_id.startswith("chatcmpl-")
        page.click(".turn.assistant .thumbs-up")
        expect(page.locator(".feedback-status").first).to_contain_text("saved")
        assert page.evaluate("localStorage.getItem('chatforge.key')") == key
        assert console_errors == []
    row = next(r for r in server.store.feedback_rows() if r["completion_id"] == completion_id)
    assert row["rating"] == 1 and row["messages"][-1]["content"] == "How do I reset my password?"
    assert row["answer"] == Redactor.from_config(PiiConfig()).redact(streamed)[0]  # what the page showed, redacted


def test_chat_page_shows_a_rejected_key_readably(server: RunningServer) -> None:
    with chromium_page() as (page, _console_errors):
        page.goto(server.url + "/")
        page.fill("#key", "cf-k_00000000-not-a-real-key")
        page.click("#save-key")
        expect(page.locator("#error")).to_have_text(re.compile(r"^401"))
        assert "check the API key" in page.inner_text("#error")
