"""The blind A/B rating page: a FastAPI app over a `RatingStore`, and `serve_rating` to run it with uvicorn.

Use it like this::

    study = build_rating_study("runs/a", "runs/b", Path("data/ds"))     # chatforge.evaluate.rating
    serve_rating("sqlite:///chatforge.db", study.id, port=8000)        # blocks; open http://127.0.0.1:8000/

    app = create_rating_app(RatingStore(db_url), study.id, access_token="s3cret")   # or run the app yourself

Routes:
    GET  /                          the page (static/rate.html: plain HTML + JS, nothing loaded from elsewhere)
    GET  /api/next?rater=NAME       the rater's next unrated item: prompt turns, "answer_1" and "answer_2" in an
                                    order the server keeps to itself, and progress; {"done": true, ...} at the end
    POST /api/rate                  {"item_id", "rater", "choice": "left"|"right"|"tie", "comment"} -> progress

With an access token (serve_rating always makes one and prints the URL with it), every route needs it: as
`?token=` (the page's URL; it then sets an HttpOnly same-site cookie for the page's own calls), that cookie, or
`Authorization: Bearer`; anything else is a 401. Every response carries the security headers of chatforge.httpsec
and the page a CSP that allows only its own inline script and style.

Errors are JSON {"detail": ...}: 404 for an item outside the study, 409 when the rater already rated the item,
422 for a bad choice, rater name or body. Handlers are plain `def`s, so FastAPI runs them in its thread pool and
several raters are served at once; each call is one short database transaction.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from importlib import resources
from typing import Literal
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge.evaluate.rating_store import (
    DEFAULT_DB_URL,
    MAX_RATER_CHARS,
    AlreadyRatedError,
    RatingStore,
    UnknownItemError,
)
from chatforge.httpsec import SecurityHeadersMiddleware, page_csp

MAX_COMMENT_CHARS = 4000
TOKEN_COOKIE = "chatforge_rating_token"


class Turn(BaseModel):
    role: str
    content: str


class Progress(BaseModel):
    rated: int = Field(description="items this rater has rated")
    total: int = Field(description="items in the study")


class NextItem(BaseModel):
    """The next item for a rater; `done` with no item once they rated them all."""

    done: bool
    item_id: int | None = None
    prompt: list[Turn] = []
    answer_1: str | None = None
    answer_2: str | None = None
    progress: Progress


class RateRequest(BaseModel):
    item_id: int
    rater: str = Field(min_length=1, max_length=MAX_RATER_CHARS)
    choice: Literal["left", "right", "tie"] = Field(description="left = Answer 1 is better, right = Answer 2")
    comment: str = Field(default="", max_length=MAX_COMMENT_CHARS)


class RateResponse(BaseModel):
    stored: bool
    progress: Progress


def rating_page() -> str:
    """The page's HTML, read from the package (chatforge/evaluate/static/rate.html)."""
    return (resources.files("chatforge.evaluate") / "static" / "rate.html").read_text(encoding="utf-8")


class AccessTokenMiddleware:
    """Pure ASGI: 401 unless the request carries `token` (query, cookie or bearer); see the module docstring."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        from_query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        scheme, _, from_header = connection.headers.get("authorization", "").partition(" ")
        from_cookie = connection.cookies.get(TOKEN_COOKIE, "")
        offered = [from_query, from_cookie, from_header if scheme.lower() == "bearer" else ""]
        if not any(hmac.compare_digest(candidate.encode(), self.token.encode()) for candidate in offered if candidate):
            response = JSONResponse({"detail": "this rating page needs its access token: open the URL that "
                                               "`chatforge rate` printed (it ends in ?token=...)"}, 401)
            await response(scope, receive, send)
            return

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and from_query:
                MutableHeaders(scope=message).append(
                    "set-cookie", f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict")
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def create_rating_app(store: RatingStore, study_id: int, access_token: str | None = None) -> FastAPI:
    """The rating app for one study of `store`, open only to holders of `access_token` when one is given;
    LookupError when the study does not exist."""
    study = store.study(study_id)
    if not study.items:
        raise ValueError(f"{store.db_url}: rating study {study_id} has no items; build it first")
    page = rating_page()
    app = FastAPI(title="chatforge rating", docs_url=None, redoc_url=None, openapi_url=None)

    def progress_of(rater: str) -> Progress:
        rated, total = store.progress(study_id, rater)
        return Progress(rated=rated, total=total)

    @app.get("/", response_class=HTMLResponse)
    def show_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": page_csp(page)})

    @app.get("/api/next", response_model=NextItem)
    def next_item(rater: str = Query(min_length=1, max_length=MAX_RATER_CHARS)) -> NextItem:
        try:
            item = store.next_item(study_id, rater)
            progress = progress_of(rater)
        except ValueError as exc:  # a name of spaces only
            raise HTTPException(422, str(exc)) from None
        if item is None:
            return NextItem(done=True, progress=progress)
        a_first = store.shown_left(study_id, item.id, rater) == "a"
        first, second = (item.answer_a, item.answer_b) if a_first else (item.answer_b, item.answer_a)
        return NextItem(done=False, item_id=item.id, prompt=[Turn(**turn) for turn in item.prompt],
                        answer_1=first, answer_2=second, progress=progress)

    @app.post("/api/rate", response_model=RateResponse)
    def rate(request: RateRequest) -> RateResponse:
        try:
            store.record(study_id, request.item_id, request.rater, request.choice, request.comment)
        except UnknownItemError as exc:
            raise HTTPException(404, str(exc)) from None
        except AlreadyRatedError as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return RateResponse(stored=True, progress=progress_of(request.rater))

    if access_token is not None:
        app.add_middleware(AccessTokenMiddleware, token=access_token)
    app.add_middleware(SecurityHeadersMiddleware)
    return app


def serve_rating(
    db_url: str = DEFAULT_DB_URL,
    study_id: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Callable[[str], None] = print,
) -> None:
    """Serve the rating page for `study_id` (default: the latest study) until interrupted; only the URL it logs
    (with a fresh access token) opens it."""
    store = RatingStore(db_url)
    try:
        study = store.study(study_id) if study_id is not None else store.latest_study()
        token = secrets.token_urlsafe(18)
        app = create_rating_app(store, study.id, access_token=token)
        log(f"rating study {study.id}: {len(study.items)} items; open http://{host}:{port}/?token={token} "
            "(Ctrl+C to stop)")
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        store.close()
