"""The HTTP front door (FastAPI): OpenAI-compatible routes in, placed and relayed requests out.

- :mod:`.app`: ``create_app(settings)``, the lifespan that owns every resource, and ``GatewayApp``, which sends the
  completion requests past FastAPI's routing to :mod:`.proxy`; :mod:`.state`: ``GatewayState``.
- :mod:`.request_context`, :mod:`.auth`: the plain-ASGI middlewares (request id and access log; API keys), with
  :mod:`.tenants` (a key's tenant, the request's priority class) and :mod:`.rate_limit` (per-tenant token buckets).
- :mod:`.routes` → :mod:`.validation` → :mod:`.proxy` (place through :mod:`gateway.dispatch`, send, relay), with
  :mod:`.retry` (tries, backoff, failure accounting), :mod:`.disconnect` (client-disconnect watching),
  :mod:`.headers`, :mod:`.fastjson` (orjson on the hot path), :mod:`.stream_end` and :mod:`.assemble`
  (non-streamed answers built from the engine's stream, usage read from streams); :mod:`.pd_relay` sends a P/D
  request as its two legs (:mod:`gateway.pd`), cancelling one when the other fails; :mod:`.openapi`: the
  documented request shapes.
"""
