"""Which HTTP headers cross the gateway, in each direction. An allowlist both ways: nothing else passes.

Client → engine: only what :func:`upstream_request_headers` builds, the request id, plus what the engine adapter
adds to pin a DP rank (vLLM's ``X-data-parallel-rank``) and the transport's own ``Host``, ``Content-Type`` and
``Content-Length`` for the engine's URL. Nothing the client sent is copied, so

- hop-by-hop headers (:data:`HOP_BY_HOP_HEADERS`) are never forwarded;
- the client cannot inject headers upstream (its rank choice, ``Authorization`` with the gateway's API key,
  cookies, ``X-Forwarded-*``, ``Host``);
- the client cannot choose where the request goes: the engine URL comes from the settings and the path from the
  route (:data:`gateway.server.proxy.ENGINE_PATHS`), never from the request's URL, query or headers.

Engine → client: only ``Content-Type`` is taken from the engine's answer (the proxy builds every response); the
gateway adds ``X-Request-Id`` and, for streams, ``Cache-Control: no-cache``. So the engine's hop-by-hop headers
(``Connection``, ``Keep-Alive``, ``Transfer-Encoding``, ``Upgrade``, ``Trailer``...) and anything else it sends
(``Set-Cookie``, ``Server``) stay at the gateway; framing is the gateway's server's own business.
"""

from __future__ import annotations

from gateway.logs import REQUEST_ID_HEADER

HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers meaningful for one connection only (RFC 9110 §7.6.1, RFC 9112 §6.1, and the non-standard but common
``Proxy-Connection``); a proxy must not forward them. Listed for reference and tests: the allowlists above
already exclude them."""


def upstream_request_headers(request_id: str) -> dict[str, str]:
    """The headers of a request sent to an engine, before rank pinning: ``X-Request-Id`` alone.

    Args:
        request_id: the request's validated id (see :func:`gateway.logs.clean_request_id`).
    """
    return {REQUEST_ID_HEADER: request_id}
