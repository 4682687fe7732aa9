"""Running the app: aiohttp's runner with a cap on open connections, and its graceful stop.

`web.run_app` has no connection limit: each idle or trickling connection of a plain `serve` costs a socket and a
handler. Past `--max-connections`, a new connection is answered 503 `overloaded` at once and closed, before its
request is read (behind the cluster's HAProxy that is a retryable 503). SIGTERM/SIGINT: stop accepting, let the
handlers in flight finish (up to `--shutdown-timeout-s`), then the app's cleanup_ctx stops the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from vqa_async.config import Settings
from vqa_async.http.app_keys import SERVICE
from vqa_async.http.errors import error_body
from vqa_async.http.tls_profile import server_context

log = logging.getLogger(__name__)


def _refusal() -> bytes:
    body = orjson.dumps(error_body("overloaded", "this server has too many open connections; retry shortly"))
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _Refuse(asyncio.Protocol):
    def __init__(self, message: bytes) -> None:
        self.message = message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        writer.write(self.message)
        writer.close()


class _ConnectionCap:
    """aiohttp's `Server` (the sites' protocol factory), refusing connections past `limit`."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server = server
        self.limit = limit
        self.refused = 0
        self._message = _refusal()

    def __call__(self) -> RequestHandler | _Refuse:
        if len(self._server.connections) >= self.limit:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("%d connections refused: at the limit of %d open ones", self.refused, self.limit)
            return _Refuse(self._message)
        return self._server()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class CappedAppRunner(web.AppRunner):
    def __init__(self, app: web.Application, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _ConnectionCap(server, self._max_connections)  # type: ignore[return-value]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """HTTPS for `serve --tls-cert --tls-key` (the cluster terminates TLS at HAProxy instead)."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    # Mozilla's intermediate profile, as at the cluster's front; ALPN: aiohttp speaks HTTP/1.1 only.
    return server_context(settings.tls_cert, settings.tls_key, ["http/1.1"])


def run(app: web.Application, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
    """Serves `app` until SIGTERM or SIGINT, then stops gracefully (what `web.run_app` does, plus the cap and the
    drain). With `--drain-s`, the first signal only makes /readyz fail and new requests get a retryable 503 for
    that long, so that a load balancer takes this process out before its socket closes: a connection refused
    while HAProxy still counts the server up waits to be retried, and HAProxy drops such a request if the server
    is marked down meanwhile. A second signal stops at once."""

    async def main() -> None:
        ssl_context = tls_context(settings)  # a bad certificate fails here, before the model loads
        runner = CappedAppRunner(app, settings.max_connections, handler_cancellation=True,
                                 access_log=None, shutdown_timeout=settings.shutdown_timeout_s)
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                raise web.GracefulExit()  # the second signal: stop now
            if settings.drain_s > 0 and not app[SERVICE].draining:
                log.info("draining for %.1f s before closing the socket", settings.drain_s)
                app[SERVICE].draining = True
                loop.call_later(settings.drain_s, stop.set)
            else:
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await runner.setup()
        try:
            site: web.BaseSite
            if settings.unix_socket:
                site = web.UnixSite(runner, settings.unix_socket)
            else:
                site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
            await site.start()
            await stop.wait()
        finally:
            await runner.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    asyncio.set_event_loop(loop)
    task = loop.create_task(main())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
