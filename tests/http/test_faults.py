"""Engines misbehaving on command (gateway.sim.mock_engine.faults): the gateway retries, trips breakers, times out and
tells the client, and no request is lost or left running on an engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.config import HealthConfig, UpstreamConfig
from tests.helpers import MODEL, Cluster, eventually, running_cluster, total

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
FAST_HEALTH = HealthConfig(probe_interval_s=0.05, probe_timeout_s=5.0, failure_threshold=2, open_s=0.3)
NO_BACKOFF = {"retry_backoff_s": 0.001, "retry_backoff_max_s": 0.001}


@contextlib.asynccontextmanager
async def cluster_and_client(policy: str, **settings: Any) -> AsyncIterator[tuple[Cluster, httpx.AsyncClient]]:
    async with running_cluster(policy, **settings) as cluster, httpx.AsyncClient(timeout=10) as http:
        yield cluster, http


async def set_faults(http: httpx.AsyncClient, engine_url: str, **plan: Any) -> None:
    r = await http.put(engine_url + "/_sim/faults", json=plan)
    assert r.status_code == 200, r.text


async def injected(http: httpx.AsyncClient, engine_url: str) -> dict[str, int]:
    body = (await http.get(engine_url + "/_sim/faults")).json()
    return dict(body["injected"])


async def gateway_metric(http: httpx.AsyncClient, cluster: Cluster, name: str, **labels: str) -> float:
    return total((await http.get(cluster.gateway_url + "/metrics")).text, name, **labels)


async def engine_aborts(http: httpx.AsyncClient, cluster: Cluster) -> float:
    sg = (await http.get(cluster.engine_urls["sg"] + "/metrics")).text
    vl = (await http.get(cluster.engine_urls["vl"] + "/metrics")).text
    return total(sg, "sglang:num_aborted_requests_total") + total(
        vl, "vllm:request_success_total", finished_reason="abort"
    )


async def stream_events(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[str]:
    """The ``data:`` payloads of one streamed answer (asserting status 200)."""
    async with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        return [line[5:].strip() async for line in r.aiter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("stream", [False, True])
async def test_5xx_from_one_engine_is_retried_on_the_other_and_its_ranks_are_taken_out(stream: bool) -> None:
    upstream = UpstreamConfig(**NO_BACKOFF)
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        await set_faults(http, cluster.engine_urls["sg"], generate="http_500")
        for _ in range(8):
            if stream:
                events = await stream_events(http, cluster.gateway_url, CHAT)
                assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
            else:
                r = await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
                assert r.status_code == 200, r.text
        failed = (await injected(http, cluster.engine_urls["sg"]))["http_500"]
        assert failed >= 1, "round robin should have sent some requests to the failing engine"
        assert await gateway_metric(http, cluster, "gateway_upstream_retries_total", engine="sg") == failed
        kind = {"engine": "sg", "kind": "http_5xx"}
        assert await gateway_metric(http, cluster, "gateway_upstream_failures_total", **kind) == failed
        ready = (await http.get(cluster.gateway_url + "/ready")).json()
        assert ready["ready"] is True and ready["engines"]["sg"]["unhealthy_ranks"], ready

        # the fault clears: after open_s the ranks are tried again and close on success
        await http.delete(cluster.engine_urls["sg"] + "/_sim/faults")
        await asyncio.sleep(FAST_HEALTH.open_s)

        async def sg_ranks_back() -> bool:
            await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
            ready = (await http.get(cluster.gateway_url + "/ready")).json()
            return not ready["engines"]["sg"]["unhealthy_ranks"]

        await eventually(sg_ranks_back)


async def test_a_failure_on_every_try_reaches_the_client_as_the_engines_error() -> None:
    upstream = UpstreamConfig(max_attempts=2, **NO_BACKOFF)
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        for url in cluster.engine_urls.values():
            await set_faults(http, url, generate="http_500")
        r = await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "injected fault: internal error"
        tries = sum([(await injected(http, url)).get("http_500", 0) for url in cluster.engine_urls.values()])
        assert tries == 2, "max_attempts=2 means exactly two tries"


async def test_a_stream_that_dies_before_its_first_event_is_retried_transparently() -> None:
    upstream = UpstreamConfig(**NO_BACKOFF)
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        await set_faults(http, cluster.engine_urls["sg"], generate="kill_mid_stream", after_chunks=0)
        for _ in range(6):
            events = await stream_events(http, cluster.gateway_url, CHAT)
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
        assert (await injected(http, cluster.engine_urls["sg"]))["kill_mid_stream"] >= 1
        assert await gateway_metric(http, cluster, "gateway_upstream_retries_total", engine="sg") >= 1


@pytest.mark.parametrize("engine", ["sg", "vl"])
async def test_a_stream_that_opens_with_the_engines_error_event_is_retried_transparently(engine: str) -> None:
    upstream = UpstreamConfig(**NO_BACKOFF)
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        await set_faults(http, cluster.engine_urls[engine], generate="error_event", remaining=2)
        for _ in range(6):
            events = await stream_events(http, cluster.gateway_url, CHAT)
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
        assert (await injected(http, cluster.engine_urls[engine]))["error_event"] == 2
        assert await gateway_metric(http, cluster, "gateway_upstream_retries_total", engine=engine) >= 1


async def test_a_non_streamed_answer_cut_off_mid_body_is_retried_transparently() -> None:
    upstream = UpstreamConfig(**NO_BACKOFF)
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        await set_faults(http, cluster.engine_urls["sg"], generate="kill_mid_stream")
        for _ in range(6):
            r = await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"], r.text
        assert (await injected(http, cluster.engine_urls["sg"]))["kill_mid_stream"] >= 1
        assert await gateway_metric(http, cluster, "gateway_upstream_retries_total", engine="sg") >= 1


async def test_retries_stop_while_most_tries_fail() -> None:
    upstream = UpstreamConfig(
        first_byte_timeout_s=0.2, retry_throttle_max_tokens=4, retry_throttle_ratio=0.1, **NO_BACKOFF
    )
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        for url in cluster.engine_urls.values():
            await set_faults(http, url, generate="hang")
        # every try times out: with 4 tokens, the first failures are retried, then retrying stops
        body = {**CHAT, "stream": True}
        answers = await asyncio.gather(
            *(http.post(cluster.gateway_url + "/v1/chat/completions", json=body) for _ in range(4))
        )
        assert [r.status_code for r in answers] == [504] * 4
        assert await gateway_metric(http, cluster, "gateway_retries_throttled_total") >= 1
        tries = await gateway_metric(http, cluster, "gateway_upstream_failures_total")
        assert tries < 4 * upstream.max_attempts, f"throttling must have saved some of the 12 tries; {tries} made"


@pytest.mark.parametrize("fault", ["kill_mid_stream", "end_without_done"])
async def test_a_stream_broken_after_its_first_events_ends_with_an_error_event_never_a_retry(fault: str) -> None:
    async with running_cluster("round_robin", health=FAST_HEALTH) as cluster, httpx.AsyncClient(timeout=10) as http:
        for url in cluster.engine_urls.values():
            await set_faults(http, url, generate=fault, after_chunks=2, remaining=1)
        body = {**CHAT, "max_tokens": 50, "ignore_eos": True}
        events = await stream_events(http, cluster.gateway_url, body)
        assert events[-1] == "[DONE]"
        tokens = [json.loads(e) for e in events[:-1]]
        assert len(tokens) == 3, f"2 token events, then the error event; got {events}"
        assert "error" in tokens[-1] and "choices" in tokens[0]
        counts = [(await injected(http, url)).get(fault, 0) for url in cluster.engine_urls.values()]
        assert sum(counts) == 1, "a started stream must not be retried"
        assert await gateway_metric(http, cluster, "gateway_upstream_retries_total") == 0
        # the other requests keep flowing
        r = await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        if fault == "kill_mid_stream":
            assert await engine_aborts(http, cluster) == 1, "the killed request is aborted in the engine"


async def test_connections_breaking_mid_answer_take_the_whole_engine_out_not_rank_by_rank() -> None:
    # one HTTP server serves all of an engine's ranks: its connections breaking is that server failing, so two
    # broken answers on two different ranks open the engine's breaker (each rank saw only one); no /health probe
    # comes in between (a successful one would start the engine's count again)
    health = HealthConfig(probe_interval_s=60.0, probe_timeout_s=5.0, failure_threshold=2, open_s=60.0)
    async with cluster_and_client("round_robin", health=health, upstream=UpstreamConfig(**NO_BACKOFF)) as (
        cluster,
        http,
    ):
        await set_faults(http, cluster.engine_urls["sg"], generate="kill_mid_stream", after_chunks=0, remaining=2)
        for _ in range(8):
            r = await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text  # retried on the other engine
        assert (await injected(http, cluster.engine_urls["sg"]))["kill_mid_stream"] == 2
        ready = (await http.get(cluster.gateway_url + "/ready")).json()
        sg = ready["engines"]["sg"]
        assert (sg["state"], sg["up"], sg["unhealthy_ranks"]) == ("open", False, []), ready
        broken = {"engine": "sg", "kind": "stream_broken"}
        assert await gateway_metric(http, cluster, "gateway_upstream_failures_total", **broken) == 2


async def test_a_hung_engine_times_out_before_the_first_byte_and_the_request_goes_elsewhere() -> None:
    upstream = UpstreamConfig(first_byte_timeout_s=0.3, **NO_BACKOFF)
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        await set_faults(http, cluster.engine_urls["sg"], generate="hang")
        for _ in range(4):
            events = await stream_events(http, cluster.gateway_url, CHAT)
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        hung = (await injected(http, cluster.engine_urls["sg"]))["hang"]
        assert hung >= 1
        timeouts = {"engine": "sg", "kind": "timeout"}
        assert await gateway_metric(http, cluster, "gateway_upstream_failures_total", **timeouts) == hung


async def test_a_stream_that_goes_silent_hits_the_idle_timeout_and_the_engine_aborts_it() -> None:
    upstream = UpstreamConfig(idle_timeout_s=0.3)
    async with cluster_and_client("round_robin", health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        for url in cluster.engine_urls.values():
            await set_faults(http, url, generate="stall_mid_stream", after_chunks=1, remaining=1)
        long = {**CHAT, "max_tokens": 5000, "ignore_eos": True}  # still generating when the gateway hangs up
        events = await stream_events(http, cluster.gateway_url, long)
        error = json.loads(events[-2])["error"]
        assert events[-1] == "[DONE]" and error["code"] == 504 and "sent nothing" in error["message"]

        async def aborted() -> bool:
            return await engine_aborts(http, cluster) == 1

        await eventually(aborted)


async def test_the_total_timeout_bounds_a_long_stream() -> None:
    upstream = UpstreamConfig(total_timeout_s=0.5, first_byte_timeout_s=0.5, idle_timeout_s=0.5)
    async with cluster_and_client("round_robin", speed=1.0, health=FAST_HEALTH, upstream=upstream) as (cluster, http):
        events = await stream_events(http, cluster.gateway_url, {**CHAT, "max_tokens": 5000, "ignore_eos": True})
        error = json.loads(events[-2])["error"]
        assert error["code"] == 504 and "in time" in error["message"]

        async def aborted() -> bool:
            return await engine_aborts(http, cluster) == 1

        await eventually(aborted)


async def test_failed_health_probes_take_an_engine_out_until_it_recovers() -> None:
    async with running_cluster("round_robin", health=FAST_HEALTH) as cluster, httpx.AsyncClient(timeout=10) as http:
        await set_faults(http, cluster.engine_urls["sg"], health="fail")

        async def sg_down() -> bool:
            return await gateway_metric(http, cluster, "gateway_engine_up", engine="sg") == 0

        await eventually(sg_down)
        ready = (await http.get(cluster.gateway_url + "/ready")).json()
        assert ready["ready"] is True and ready["engines"]["sg"]["state"] in ("open", "half_open")
        before = await gateway_metric(http, cluster, "gateway_dispatched_requests_total", engine="sg")
        for _ in range(6):
            r = await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
        assert await gateway_metric(http, cluster, "gateway_dispatched_requests_total", engine="sg") == before
        assert await gateway_metric(http, cluster, "gateway_health_checks_total", engine="sg", result="error") >= 2

        await http.delete(cluster.engine_urls["sg"] + "/_sim/faults")

        async def sg_up() -> bool:
            return await gateway_metric(http, cluster, "gateway_engine_up", engine="sg") == 1

        await eventually(sg_up)
        for _ in range(6):
            await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
        assert await gateway_metric(http, cluster, "gateway_dispatched_requests_total", engine="sg") > before


async def test_a_hung_health_endpoint_counts_as_down() -> None:
    health = HealthConfig(probe_interval_s=0.05, probe_timeout_s=0.1, failure_threshold=2, open_s=0.3)
    async with running_cluster("round_robin", health=health) as cluster, httpx.AsyncClient(timeout=10) as http:
        await set_faults(http, cluster.engine_urls["vl"], health="hang")

        async def vl_down() -> bool:
            ready = (await http.get(cluster.gateway_url + "/ready")).json()
            return bool(ready["engines"]["vl"]["state"] != "closed")

        await eventually(vl_down)
        r = await http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200


async def test_slow_or_garbage_metrics_never_block_dispatch() -> None:
    async with running_cluster("sbs", health=FAST_HEALTH) as cluster, httpx.AsyncClient(timeout=10) as http:
        await set_faults(http, cluster.engine_urls["sg"], metrics="hang")
        await set_faults(http, cluster.engine_urls["vl"], metrics="garbage")

        async def both_failed() -> bool:
            metrics = (await http.get(cluster.gateway_url + "/metrics")).text
            return all(total(metrics, "gateway_scrape_errors_total", engine=e) >= 1 for e in ("sg", "vl"))

        await eventually(both_failed)
        results = await asyncio.gather(
            *(http.post(cluster.gateway_url + "/v1/chat/completions", json=CHAT) for _ in range(10))
        )
        assert [r.status_code for r in results] == [200] * 10
