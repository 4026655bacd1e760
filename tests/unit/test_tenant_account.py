"""A request's account with its tenant (:class:`~gateway.server.tenants.TenantAccount`), which the chat and
completions relay and the Responses relay share: admission, the class TTFT, the settlement and the 503 refund,
driven with the time passed in."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimitedError
from gateway.server.tenants import RequestTenant, Tenant, admit
from gateway.telemetry import GatewayMetrics
from gateway.types import PendingRequest


def pending(prompt_tokens: int) -> PendingRequest:
    return PendingRequest(request_id="r", model="m", prompt_tokens=prompt_tokens, max_output_tokens=16, arrival_s=0.0)


def metrics() -> GatewayMetrics:
    return GatewayMetrics()


def sample(seen: GatewayMetrics, name: str, **labels: str) -> float | None:
    return seen.registry.get_sample_value(name, labels)


def test_admission_gives_the_request_its_tenant_and_class_and_takes_its_prompt_estimate() -> None:
    tenant = Tenant("chat", 0, tokens_per_minute=60)  # one token a second
    seen = metrics()
    request = pending(20)
    account = admit(RequestTenant(tenant, 2, "batch"), seen, 0.0, request)
    assert (request.tenant, request.priority, account.taken) == ("chat", 2, 20)
    account.first_token(0.25)
    assert sample(seen, "gateway_class_ttft_seconds_sum", priority="batch") == 0.25
    # the answer used 30 prompt tokens (reported) and 15 output tokens: 25 more than taken
    account.settle(200, 20, 30, 15, 0.0)
    with pytest.raises(RateLimitedError) as caught:
        admit(RequestTenant(tenant, 2, "batch"), seen, 0.0, pending(20))
    assert caught.value.retry_after_s == 5  # 15 left, 20 needed
    assert sample(seen, "gateway_rate_limited_total", tenant="chat", limit="tokens") == 1


def test_an_unreported_prompt_is_settled_on_the_estimate_and_a_503_before_any_token_is_refunded() -> None:
    tenant = Tenant("chat", 0, tokens_per_minute=60)
    seen = metrics()
    account = admit(RequestTenant(tenant, 0, "interactive"), seen, 0.0, pending(40))
    account.settle(200, 40, None, 10, 0.0)  # estimate 40 + 10 output events
    assert tenant._tokens is not None and tenant._tokens.available(0.0) == 10
    account = admit(RequestTenant(tenant, 0, "interactive"), seen, 0.0, pending(10))
    account.settle(503, 10, None, 0, 0.0)  # turned away unserved: the 10 come back
    assert tenant._tokens.available(0.0) == 10
    account = admit(RequestTenant(tenant, 0, "interactive"), seen, 0.0, pending(10))
    account.settle(503, 10, None, 3, 0.0)  # failed after 3 tokens: charged
    assert tenant._tokens.available(0.0) == -3


def test_a_request_that_generates_nothing_takes_one_request_and_no_tokens() -> None:
    tenant = Tenant("etl", 2, requests_per_minute=2, tokens_per_minute=60)
    seen = metrics()
    account = admit(RequestTenant(tenant, 2, "batch"), seen, 0.0, pending(60))
    account.settle(200, 60, 60, 40, 0.0)  # the tokens bucket is now 40 in debt
    assert admit(RequestTenant(tenant, 2, "batch"), seen, 0.0).taken == 0  # a retrieval: not stopped by the debt
    with pytest.raises(RateLimitedError) as caught:
        admit(RequestTenant(tenant, 2, "batch"), seen, 0.0)
    assert (caught.value.limit, caught.value.retry_after_s) == ("requests", 30)
    assert sample(seen, "gateway_rate_limited_total", tenant="etl", limit="requests") == 1
