"""What ``finetune serve`` refuses before a request reaches the model: bodies over a size
(checked against Content-Length and again while the body arrives, for chunked uploads), and a
port already taken."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from finetune.errors import ConfigError


@dataclass
class Limits:
    max_request_bytes: int = 20 * 2**20  # the whole body
    max_pixels: int = 40_000_000  # one image's width x height, read from its header
    max_images: int = 64  # images in one request


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is answered 413 without being read further."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self, size: int | None = None) -> JSONResponse:
        body = "request body" + (f" ({size:,} bytes)" if size else "")
        return error_response(413, f"{body} over this server's limit of {self.max_bytes:,} "
                                   f"bytes (finetune serve --max-request-mb); send fewer or "
                                   f"smaller images per request")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            return await error_response(400, "Content-Length is not a number")(
                scope, receive, send)
        if int(length) > self.max_bytes:
            return await self._refusal(int(length))(scope, receive, send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _TooLarge:
            if started:
                raise
            await self._refusal()(scope, receive, send)


def check_port(host: str, port: int) -> None:
    """A one-line error when ``host:port`` cannot be listened on (taken, or not this
    machine's address), before the model is loaded."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = ("is already in use: stop what listens there, or pass another --port"
                   if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e.strerror})")
            raise ConfigError(f"{host}:{port} {why}") from None
