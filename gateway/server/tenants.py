"""Tenants: which tenant a key belongs to, the priority class of a request, and each tenant's rate limits.

Built from the ``tenants`` section (:class:`~gateway.config.TenantsConfig`) when it is set; without it the gateway
has no tenants and nothing here runs.

- **Who.** A key of a named tenant (``tenants.tenants[].api_keys`` or its key file) makes the request that
  tenant's; any other accepted key (``security.api_keys``, an admin key) or no key at all (when none is configured)
  makes it the tenant ``default``'s. Keys are held and matched as :class:`~gateway.server.auth.KeyRing` holds them:
  SHA-256 digests, compared in constant time against every tenant's keys, no early exit.
- **Class.** The tenant's class (``priority``, else ``default_class``), which the header the operator names in
  ``priority_header`` may lower (or, with ``header_may_raise``, set to any class). A value naming no class, or a
  higher class than allowed, is an OpenAI-style 400 (``invalid_request_error``, ``param`` the header).
- **Limits.** Per tenant, a token bucket for requests a minute and one for tokens a minute
  (:mod:`gateway.server.rate_limit`). At admission (:func:`admit`) a request that generates (a chat completion, a
  completion, a Responses ``POST``, follow-ups included) takes 1 request and its prompt estimate in tokens; when the
  answer ends, :meth:`TenantAccount.settle` charges the difference between that estimate and the tokens used: the
  prompt tokens the engine reported (the estimate when it reported none) plus the output tokens (the engine's count
  where the caller has one, else the streamed events, one a token, as the scheduler counts them); a request turned
  away with 503 before any token (window full, queue timeout, no engine) gets its tokens back. A request that
  generates nothing (a stored response's retrieval, delete or cancel) takes 1 request only. Over a limit: HTTP 429
  ``rate_limit_exceeded`` with ``Retry-After`` from the bucket's refill, counted in ``gateway_rate_limited_total``.
- **Class TTFT.** :meth:`TenantAccount.first_token` observes a request's time to first token under its class
  (``gateway_class_ttft_seconds``).

The buckets live in this process: with ``gateway serve --workers N`` each front door limits what reaches it, so a
tenant spread evenly over N front doors gets up to N times its limit (``README.md``, "Tenants and priorities").
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config import DEFAULT_TENANT, TenantConfig, TenantsConfig
from gateway.errors import InvalidRequestError, RateLimitedError
from gateway.server.rate_limit import TokenBucket, retry_after_s
from gateway.telemetry import GatewayMetrics
from gateway.types import PendingRequest

TENANT_SCOPE_KEY = "gateway.tenant"
"""The ASGI scope key under which the API-key middleware leaves a request's :class:`RequestTenant`."""


class Tenant:
    """One tenant: its name, class and rate-limit buckets (created at the first request, full).

    Args:
        name: the tenant's name.
        priority: index of its class in ``tenants.classes`` (0 the highest).
        weight: its share against other tenants of its class (virtual token counter).
        requests_per_minute: the requests limit, ``None`` for none.
        tokens_per_minute: the tokens limit, ``None`` for none.
    """

    def __init__(
        self,
        name: str,
        priority: int,
        weight: float = 1.0,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ) -> None:
        self.name = name
        self.priority = priority
        self.weight = weight
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._requests: TokenBucket | None = None
        self._tokens: TokenBucket | None = None

    @property
    def limited(self) -> bool:
        """Whether the tenant has any rate limit."""
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def admit(self, prompt_tokens: int | None, now: float) -> int:
        """Take one request and ``prompt_tokens`` from the tenant's buckets; return the tokens taken (to settle).
        ``prompt_tokens`` ``None``: a request that generates no tokens, which only the requests bucket limits.

        Raises:
            RateLimitedError: a bucket does not hold enough; nothing was taken.
        """
        if self.requests_per_minute is not None and self._requests is None:
            self._requests = TokenBucket(self.requests_per_minute, now)
        if self.tokens_per_minute is not None and self._tokens is None:
            self._tokens = TokenBucket(self.tokens_per_minute, now)
        requests, tokens = self._requests, self._tokens
        if requests is not None and (wait := requests.wait_s(1, now)) > 0:
            raise RateLimitedError(
                f"Rate limit reached for tenant {self.name} on requests per minute: limit "
                f"{self.requests_per_minute:g}. Please try again in {wait:.1f}s.",
                limit="requests",
                retry_after_s=retry_after_s(wait),
            )
        if prompt_tokens is None:
            tokens = None
        elif tokens is not None and (wait := tokens.wait_s(prompt_tokens, now)) > 0:
            raise RateLimitedError(
                f"Rate limit reached for tenant {self.name} on tokens per minute: limit {self.tokens_per_minute:g}, "
                f"requested {prompt_tokens}. Please try again in {wait:.1f}s.",
                limit="tokens",
                retry_after_s=retry_after_s(wait),
            )
        if requests is not None:
            requests.take(1, now)
        if tokens is not None and prompt_tokens is not None:
            tokens.take(prompt_tokens, now)
            return prompt_tokens
        return 0

    def settle(self, taken: int, used: int, now: float) -> None:
        """The answer ended having used ``used`` tokens of which ``taken`` were taken at admission: charge the rest
        (or refund it)."""
        if self._tokens is not None and used != taken:
            self._tokens.charge(used - taken, now)


@dataclass(frozen=True, slots=True)
class RequestTenant:
    """Whose a request is and in which class, as the API-key middleware found it.

    Attributes:
        tenant: the tenant (its limits are taken by the proxy once the prompt is counted).
        priority: index of the request's class in ``tenants.classes`` (0 the highest).
        priority_name: the class's name (metric label ``priority``).
    """

    tenant: Tenant
    priority: int
    priority_name: str


@dataclass(slots=True)
class TenantAccount:
    """One request's account with its tenant, from admission (:func:`admit`) to the end of its answer: the one
    place both the chat and completions relay (:mod:`gateway.server.proxy`) and the Responses relay
    (:mod:`gateway.server.responses`) charge tenants.

    Attributes:
        request: the request's tenant and class.
        metrics: where the class TTFT is observed.
        taken: tokens taken from the tenant's tokens-a-minute bucket at admission (settled by :meth:`settle`).
    """

    request: RequestTenant
    metrics: GatewayMetrics
    taken: int = 0

    def first_token(self, ttft_s: float) -> None:
        """Observe the request's time to first token, seconds, in its class."""
        self.metrics.class_ttft.labels(self.request.priority_name).observe(ttft_s)

    def settle(
        self, status: int | str, estimated_prompt: int, reported_prompt: int | None, output_tokens: int, now: float
    ) -> None:
        """The answer ended with ``status``: charge the tokens it used against those taken at admission.

        Args:
            status: the answer's status (``503`` with no prompt reported and no output: turned away unserved, the
                tokens taken come back).
            estimated_prompt: the gateway's prompt estimate, tokens (what was taken).
            reported_prompt: the prompt tokens the engine reported, ``None`` when it reported none.
            output_tokens: the output tokens (the engine's count, or the streamed events).
            now: the state's clock, seconds.
        """
        tenant = self.request.tenant
        if tenant.tokens_per_minute is None:
            return
        used = (estimated_prompt if reported_prompt is None else reported_prompt) + output_tokens
        if str(status) == "503" and reported_prompt is None and not output_tokens:
            used = 0  # turned away unserved (window full, queue timeout, no engine): the tokens come back
        tenant.settle(self.taken, used, now)


def admit(
    request: RequestTenant, metrics: GatewayMetrics, now: float, pending: PendingRequest | None = None
) -> TenantAccount:
    """Charge a request to its tenant's rate limits. A request that generates (``pending``) takes one request and its
    prompt estimate and is given its tenant's name and class (which the window orders by and the virtual token counter
    charges); without ``pending`` (a retrieval, delete or cancel) one request is taken, no tokens.

    Raises:
        RateLimitedError: a limit is used up (counted in ``gateway_rate_limited_total``); nothing was taken.
    """
    tenant = request.tenant
    if pending is not None:
        pending.tenant, pending.priority = tenant.name, request.priority
    try:
        taken = tenant.admit(None if pending is None else pending.prompt_tokens, now)
    except RateLimitedError as exc:
        metrics.rate_limited.labels(tenant.name, exc.limit).inc()
        raise
    return TenantAccount(request, metrics, taken)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def tenant_keys(config: TenantConfig) -> list[str]:
    """A tenant's keys: its list plus its key file's.

    Raises:
        OSError: the key file cannot be read.
    """
    from gateway.server.auth import read_key_file

    keys = [k.get_secret_value() for k in config.api_keys]
    if config.api_keys_file is not None:
        keys += read_key_file(config.api_keys_file)
    return [k for k in keys if k]


class TenantBook:
    """The tenants of one gateway, their keys and classes.

    Args:
        config: the ``tenants`` section.

    Raises:
        OSError: a key file cannot be read.
        ValueError: one key belongs to two tenants.
    """

    def __init__(self, config: TenantsConfig) -> None:
        self.config = config
        self.classes = tuple(config.classes)
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        default_class = self._class_index[config.default_class]
        self.default = Tenant(DEFAULT_TENANT, default_class)
        self.tenants: dict[str, Tenant] = {DEFAULT_TENANT: self.default}
        self._digests: list[tuple[bytes, Tenant]] = []
        owner: dict[bytes, str] = {}
        for entry in config.tenants:
            tenant = Tenant(
                entry.name,
                default_class if entry.priority is None else self._class_index[entry.priority],
                entry.weight,
                entry.requests_per_minute,
                entry.tokens_per_minute,
            )
            self.tenants[entry.name] = tenant
            for key in tenant_keys(entry):
                digest = _digest(key)
                if owner.setdefault(digest, entry.name) != entry.name:
                    raise ValueError(f"tenants: a key belongs to both {owner[digest]!r} and {entry.name!r}")
                self._digests.append((digest, tenant))
        self.header = None if config.priority_header is None else config.priority_header.encode("latin-1")

    def all_keys(self) -> Iterable[str]:
        """Every named tenant's keys (the API-key check accepts them).

        Raises:
            OSError: a key file cannot be read.
        """
        for entry in self.config.tenants:
            yield from tenant_keys(entry)

    def identify(self, key: str | None) -> Tenant:
        """The tenant ``key`` belongs to (``default`` for any key no tenant names, or none); compares against every
        tenant's key in constant time."""
        if key is None:
            return self.default
        digest = _digest(key)
        found = self.default
        for known, tenant in self._digests:
            if hmac.compare_digest(digest, known):
                found = tenant
        return found

    def request_class(self, tenant: Tenant, header: str | None) -> RequestTenant:
        """The class of a request of ``tenant`` carrying ``header`` (the priority header's value, ``None`` when
        absent or the header is off).

        Raises:
            InvalidRequestError: the value names no class, or a class above the tenant's without
                ``header_may_raise``.
        """
        if header is None:
            return RequestTenant(tenant, tenant.priority, self.classes[tenant.priority])
        name = header.strip().lower()
        param = self.config.priority_header
        index = self._class_index.get(name)
        if index is None:
            raise InvalidRequestError(
                f"Invalid value for header {param}: {header!r}; expected one of {', '.join(self.classes)}.",
                param=param,
            )
        if index < tenant.priority and not self.config.header_may_raise:
            raise InvalidRequestError(
                f"Header {param} may only lower the class of this key's requests: {name!r} is above "
                f"{self.classes[tenant.priority]!r}.",
                param=param,
            )
        return RequestTenant(tenant, index, name)
