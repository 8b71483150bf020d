"""Security headers for chatforge's web pages and APIs (the serve app and the rating page use it).

Use it like this::

    app.add_middleware(SecurityHeadersMiddleware)               # every response: nosniff, DENY framing, no referrer,
                                                                # and a CSP that allows nothing (JSON needs nothing)
    HTMLResponse(page, headers={"Content-Security-Policy": page_csp(page)})   # a page: its own inline code only

`page_csp` allows exactly the page's inline <script> and <style> blocks (by their sha256), requests to its own
origin, and nothing else: no other origin's scripts, no inline event handlers, no framing by other sites.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer",
                    "cross-origin-opener-policy": "same-origin"}
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)  # our own static pages only, never user input


def page_csp(html: str) -> str:
    """A Content-Security-Policy that lets `html`'s own inline scripts and styles run, and fetches go to 'self'."""
    sources: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
        sources[tag].append(f"'sha256-{digest}'")
    return (f"default-src 'none'; script-src {' '.join(sources['script']) or 'none'}; "
            f"style-src {' '.join(sources['style']) or 'none'}; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class SecurityHeadersMiddleware:
    """Pure ASGI: adds SECURITY_HEADERS, and API_CSP unless the response set its own CSP, to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("content-security-policy", API_CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)
