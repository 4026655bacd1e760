"""Optional API keys, checked by a plain ASGI middleware (not ``BaseHTTPMiddleware``, which hides disconnects).

Which endpoint needs which key:

============================================  ===========================================================
``/health``, ``/ready``                       always open (load balancer and Kubernetes probes)
``/metrics``                                  open by default (``security.metrics_auth: open``), else admin
``/admin/...``, ``/docs``, ``/redoc``,         admin key; when no admin key is configured, an API key; when
``/openapi.json``                             neither is, open
everything else (``/v1/...``)                  API key or admin key, when any is configured; else open
============================================  ===========================================================

A key is sent as ``Authorization: Bearer <key>``. It is compared in constant time against every configured key
(:func:`hmac.compare_digest` over SHA-256 digests, so neither the position of the first differing byte nor the
key's length shows in the timing) and never logged. A missing or wrong key gets HTTP 401 with an OpenAI-style
``invalid_api_key`` error and ``WWW-Authenticate: Bearer``.

With tenants configured (:mod:`gateway.server.tenants`), the keys of every named tenant are API keys too, and on the
OpenAI endpoints the middleware leaves the request's tenant and priority class in the scope
(:data:`~gateway.server.tenants.TENANT_SCOPE_KEY`), or answers an invalid priority header with HTTP 400.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import SecurityConfig
from gateway.errors import AuthenticationError, GatewayError
from gateway.server.tenants import TENANT_SCOPE_KEY, TenantBook

OPEN_PATHS = frozenset({"/health", "/ready"})
"""Paths that never need a key."""
ADMIN_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Introspection paths that need an admin key (besides everything under ``/admin/``)."""

Access = Literal["open", "api", "admin"]


class KeyRing:
    """A set of secret keys, matched in constant time. Holds SHA-256 digests only, never the keys.

    Args:
        keys: the keys; empty strings are dropped.
        compare: compares two 32-byte digests in constant time (:func:`hmac.compare_digest`; a test passes a
            counting one).
    """

    def __init__(self, keys: Iterable[str], *, compare: Callable[[bytes, bytes], bool] = hmac.compare_digest) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys if k)
        self._compare = compare

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._digests)} keys)"

    def matches(self, presented: str) -> bool:
        """Whether ``presented`` is one of the keys; compares against every key (no early exit)."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = False
        for known in self._digests:
            found |= self._compare(digest, known)
        return found


def read_key_file(path: Path) -> list[str]:
    """Keys from a file, one a line; surrounding whitespace, blank lines and ``#`` comment lines are skipped.

    Raises:
        OSError: the file cannot be read.
    """
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys


def key_rings(config: SecurityConfig, tenants: TenantBook | None = None) -> tuple[KeyRing, KeyRing]:
    """The API and admin key rings of ``config`` (lists plus files); with ``tenants``, every named tenant's keys
    are API keys too.

    Raises:
        OSError: a key file cannot be read.
    """
    api = [k.get_secret_value() for k in config.api_keys]
    admin = [k.get_secret_value() for k in config.admin_keys]
    if config.api_keys_file is not None:
        api += read_key_file(config.api_keys_file)
    if config.admin_keys_file is not None:
        admin += read_key_file(config.admin_keys_file)
    if tenants is not None:
        api += tenants.all_keys()
    return KeyRing(api), KeyRing(admin)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    """Refuses HTTP requests without the key their path needs (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        api_keys: keys for the OpenAI endpoints.
        admin_keys: keys for the admin endpoints (also accepted on the OpenAI endpoints).
        protect_metrics: whether ``/metrics`` needs an admin key.
        tenants: the tenants (``None``: none configured): requests to the OpenAI endpoints get their tenant and
            class in the scope.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: KeyRing,
        admin_keys: KeyRing,
        protect_metrics: bool,
        tenants: TenantBook | None = None,
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.admin_keys = admin_keys
        self.protect_metrics = protect_metrics
        self.tenants = tenants

    def access(self, path: str) -> Access:
        """Which key ``path`` needs."""
        if path in OPEN_PATHS or (path == "/metrics" and not self.protect_metrics):
            return "open"
        if path == "/metrics" or path in ADMIN_PATHS or path.startswith("/admin/"):
            return "admin"
        return "api"

    def allowed(self, path: str, key: str | None) -> bool:
        """Whether a request for ``path`` carrying ``key`` (``None``: no bearer token) may pass."""
        access = self.access(path)
        if access == "open":
            return True
        if access == "admin" and self.admin_keys:
            return key is not None and self.admin_keys.matches(key)
        if not self.api_keys and not self.admin_keys:
            return True
        return key is not None and (self.api_keys.matches(key) | self.admin_keys.matches(key))

    def _tenant(self, scope: Scope, key: str | None) -> None:
        """Leave the request's tenant and class in ``scope`` (OpenAI endpoints, tenants configured).

        Raises:
            InvalidRequestError: the priority header's value is refused.
        """
        tenants = self.tenants
        if tenants is None or self.access(scope["path"]) != "api":
            return
        header = None
        if tenants.header is not None:
            for name, value in scope.get("headers", ()):
                if name.lower() == tenants.header:
                    header = value.decode("latin-1")
                    break
        scope[TENANT_SCOPE_KEY] = tenants.request_class(tenants.identify(key), header)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = _bearer(scope)
        if self.allowed(scope["path"], key):
            try:
                self._tenant(scope, key)
            except GatewayError as exc:
                await _error(send, exc, [])
                return
            await self.app(scope, receive, send)
            return
        error = AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            if key is None
            else "Incorrect API key provided."
        )
        await _error(send, error, [(b"www-authenticate", b"Bearer")])


async def _error(send: Send, error: GatewayError, extra: list[tuple[bytes, bytes]]) -> None:
    """Answer with ``error``'s OpenAI-style body and status."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
