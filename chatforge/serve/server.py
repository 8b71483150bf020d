"""How uvicorn runs the serve app: connection cap, header deadline, keep-alive; what `chatforge serve` and the
tests use.

Use it like this::

    server = uvicorn.Server(uvicorn_config(app, cfg, host="127.0.0.1", port=8000))
    server.run()

- `limit_concurrency`: connections (or running requests) beyond serve.max_connections get 503 at once; the cap
  stays 32 below this process's open-file limit, so the server never runs out of descriptors (`Too many open
  files`) and always has some left for its database and its upstream.
- a connection must complete its request headers within serve.header_timeout_s of opening (or of its previous
  response), else it is closed (h11 with a timer, `HeaderDeadlineH11Protocol`); the body deadline is the
  middleware's (408).
- idle keep-alive connections close after serve.keep_alive_s.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from chatforge.config import ServeConfig

DESCRIPTORS_KEPT_FREE = 32


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not send complete request headers in time."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        previous = getattr(self, "_header_deadline", None)
        if previous is not None:
            previous.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _headers_overdue(self) -> None:
        # IDLE: no complete request line and headers yet on this cycle (SEND_BODY/DONE belong to the body deadline)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to stay DESCRIPTORS_KEPT_FREE below the soft open-file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - DESCRIPTORS_KEPT_FREE))


def uvicorn_config(app: Any, cfg: ServeConfig, **options: Any) -> uvicorn.Config:
    """uvicorn.Config for `app` with the limits of `cfg` (see the module docstring); `options` go to uvicorn."""
    protocol = type("HeaderDeadlineH11Protocol", (HeaderDeadlineH11Protocol,),
                    {"header_timeout_s": cfg.header_timeout_s})
    settings: dict[str, Any] = {"log_level": "warning", "access_log": False, "http": protocol,
                                "limit_concurrency": connection_cap(cfg.max_connections),
                                "timeout_keep_alive": cfg.keep_alive_s}
    settings.update(options)
    return uvicorn.Config(app, **settings)
