"""Tenants: the ``tenants`` settings, keys to tenants, priority classes from the header, and the rate limits' token
buckets, driven with the time passed in."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import SecurityConfig, Settings, TenantConfig, TenantsConfig
from gateway.errors import InvalidRequestError, RateLimitedError
from gateway.server.auth import key_rings
from gateway.server.rate_limit import TokenBucket, retry_after_s
from gateway.server.tenants import Tenant, TenantBook


def tenants(**extra: object) -> TenantsConfig:
    return TenantsConfig(
        tenants=[
            TenantConfig(name="chat", api_keys=["sk-chat"], priority="interactive"),
            TenantConfig(name="etl", api_keys=["sk-etl"], priority="batch", requests_per_minute=2),
        ],
        **extra,  # type: ignore[arg-type]
    )


def test_tenants_are_off_by_default_and_validated() -> None:
    assert Settings().tenants is None
    config = TenantsConfig()
    assert config.classes == ["interactive", "standard", "batch"] and config.default_class == "standard"
    bad = [
        {"default_class": "gold"},
        {"classes": ["a", "a"], "default_class": "a"},
        {"tenants": [{"name": "x", "priority": "gold"}]},
        {"tenants": [{"name": "x"}, {"name": "x"}]},
        {"tenants": [{"name": "default"}]},
        {"tenants": [{"name": "has space"}]},
        {"priority_header": "X-Priority"},
        {"tenants": [{"name": "x", "requests_per_minute": 0}]},
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            TenantsConfig.model_validate(fields)


def test_token_bucket_refills_continuously_and_settles_debt() -> None:
    bucket = TokenBucket(60, now=0.0)  # one a second, 60 at most
    assert bucket.available(0.0) == 60 and bucket.wait_s(60, 0.0) == 0
    bucket.take(60, 0.0)
    assert bucket.wait_s(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_s(1, 0.5) == pytest.approx(0.5)
    assert bucket.available(10.0) == pytest.approx(10.0)
    assert bucket.available(1000.0) == 60  # never above a minute's worth
    assert bucket.wait_s(500, 1000.0) == 0  # more than a minute's worth waits for a full bucket only
    bucket.take(90, 1000.0)
    assert bucket.available(1000.0) == pytest.approx(-30)  # in debt
    assert bucket.wait_s(1, 1000.0) == pytest.approx(31.0)
    bucket.charge(-100, 1000.0)  # a refund, capped at a full bucket
    assert bucket.available(1000.0) == 60
    assert [retry_after_s(w) for w in (0.01, 1.0, 1.2, 29.5)] == [1, 1, 2, 30]
    with pytest.raises(ValueError):
        TokenBucket(0, now=0.0)


def test_requests_per_minute_answer_429_with_retry_after_from_the_refill() -> None:
    tenant = Tenant("etl", 2, requests_per_minute=2)
    assert tenant.admit(100, 0.0) == 0 and tenant.admit(100, 0.0) == 0
    with pytest.raises(RateLimitedError) as caught:
        tenant.admit(100, 0.0)
    error = caught.value
    assert (error.status, error.limit, error.retry_after_s) == (429, "requests", 30)
    assert error.body()["error"]["code"] == "rate_limit_exceeded" and error.body()["error"]["type"] == "requests"
    with pytest.raises(RateLimitedError) as caught:
        tenant.admit(100, 20.0)
    assert caught.value.retry_after_s == 10
    tenant.admit(100, 30.0)


def test_tokens_per_minute_take_the_estimate_and_settle_the_usage() -> None:
    tenant = Tenant("chat", 0, tokens_per_minute=1200)  # 20 tokens a second
    assert tenant.admit(600, 0.0) == 600
    assert tenant.admit(600, 0.0) == 600
    with pytest.raises(RateLimitedError) as caught:
        tenant.admit(100, 0.0)
    assert (caught.value.limit, caught.value.retry_after_s) == ("tokens", 5)
    # the first answer used 500 prompt tokens and 100 completion tokens: nothing to settle
    tenant.settle(600, 600, 0.0)
    # the second used only 200: 400 come back at once
    tenant.settle(600, 200, 0.0)
    assert tenant.admit(400, 0.0) == 400
    # an answer that used more than its estimate leaves the bucket in debt: the next request waits it out
    tenant.settle(400, 1000, 0.0)
    with pytest.raises(RateLimitedError) as caught:
        tenant.admit(1, 0.0)
    assert caught.value.retry_after_s == 31  # 600 tokens of debt + 1, at 20 a second
    # a rejected request takes nothing from either bucket
    both = Tenant("both", 0, requests_per_minute=10, tokens_per_minute=60)
    both.admit(60, 0.0)
    with pytest.raises(RateLimitedError):
        both.admit(60, 0.0)
    assert both._requests is not None and both._requests.available(0.0) == 9


def test_keys_name_their_tenant_and_other_keys_the_default_one(tmp_path: Path) -> None:
    key_file = tmp_path / "etl.keys"
    key_file.write_text("# batch jobs\nsk-etl-2\n")
    config = TenantsConfig(
        tenants=[
            TenantConfig(name="chat", api_keys=["sk-chat"], priority="interactive"),
            TenantConfig(name="etl", api_keys=["sk-etl"], api_keys_file=key_file, priority="batch"),
        ]
    )
    book = TenantBook(config)
    assert book.identify("sk-chat").name == "chat"
    assert book.identify("sk-etl").name == book.identify("sk-etl-2").name == "etl"
    assert book.identify("sk-flat").name == book.identify(None).name == "default"
    assert book.identify(None).priority == 1  # the default class, standard
    api, _ = key_rings(SecurityConfig(api_keys=["sk-flat"]), book)
    assert all(api.matches(k) for k in ("sk-flat", "sk-chat", "sk-etl", "sk-etl-2"))
    assert not api.matches("sk-other")
    twice = TenantsConfig(tenants=[TenantConfig(name="a", api_keys=["k"]), TenantConfig(name="b", api_keys=["k"])])
    with pytest.raises(ValueError, match="belongs to both"):
        TenantBook(twice)


def test_the_priority_header_may_lower_the_class_unless_allowed_to_raise_it() -> None:
    book = TenantBook(tenants(priority_header="x-priority"))
    chat, etl = book.identify("sk-chat"), book.identify("sk-etl")
    assert book.request_class(chat, None).priority_name == "interactive"
    assert book.request_class(chat, "batch").priority == 2
    assert book.request_class(chat, " Standard ").priority_name == "standard"
    with pytest.raises(InvalidRequestError) as caught:
        book.request_class(etl, "interactive")
    assert caught.value.status == 400 and caught.value.param == "x-priority"
    with pytest.raises(InvalidRequestError, match="expected one of interactive, standard, batch"):
        book.request_class(chat, "urgent")
    raising = TenantBook(tenants(priority_header="x-priority", header_may_raise=True))
    assert raising.request_class(raising.identify("sk-etl"), "interactive").priority == 0
