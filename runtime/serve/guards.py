"""ASGI guards in front of the app: which ``Host`` and ``Origin`` a request may carry, and a body read timeout.

Browsers are the reason for the first two: a page of another site can POST a form to a server on 127.0.0.1
(its ``Origin`` then names that site), and a DNS-rebinding page reaches it under its own host name (its
``Host`` then names that site). Non-browser clients send neither problem. The timeout stops a client that
declares a body and sends less of it from holding a connection (and an upload folder) forever.
"""
from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


class BodyTimeout(Exception):
    """The client stopped sending the request body for longer than the server's body timeout."""


def _json_error(status: int, message: str, param: str | None = None) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param}}).encode()
    return {"status": status, "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())]}, body


def _hostname(host: str) -> str:
    """``example.com:8000`` / ``[::1]:8000`` → ``example.com`` / ``::1`` (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """``allowed_hosts`` None accepts any ``Host``; an ``Origin`` header must name this server (the request's own
    ``Host``) or one of ``allowed_origins``. ``body_timeout_s`` bounds the wait for each piece of a body."""

    def __init__(self, app, *, allowed_hosts: set[str] | None, allowed_origins: set[str] = frozenset(),
                 body_timeout_s: float = 30.0):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host and _hostname(host) not in self.allowed_hosts:
            return await self._refuse(send, 403,
                                      f"Host {host!r} is not a name of this server; use http://127.0.0.1 (or start "
                                      "the server with --allowed_host NAME)", "Host")
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, host, scope):
            return await self._refuse(send, 403, f"cross-site request from Origin {origin!r} refused; use the "
                                                 "server's own page (or start it with --allowed_origin)", "Origin")
        return await self.app(scope, self._timed(receive), send)

    def _same_origin(self, origin: str, host: str, scope) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, file: pages) and anything odd
        return parts.netloc == host.strip().lower()

    def _timed(self, receive):
        state = {"done": False}
        timeout = self.body_timeout_s

        async def timed_receive():
            if state["done"]:
                return await receive()  # after the body: waiting for a disconnect has no deadline
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["done"] = True
            return message

        return timed_receive

    @staticmethod
    async def _refuse(send, status: int, message: str, param: str) -> None:
        start, body = _json_error(status, message, param)
        await send({"type": "http.response.start", **start})
        await send({"type": "http.response.body", "body": body})
