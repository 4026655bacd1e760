"""Kubernetes discovery (:mod:`gateway.discovery.kubernetes`) against a fake API server: a small aiohttp app that
answers the pod list and watch requests of the official client with recorded-style answers (Pod JSON as the API
server sends it, resourceVersions, ADDED/MODIFIED/DELETED events, a 410 Gone on resume), in front of simulated
engines the pods stand for."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from gateway.config import KubernetesDiscoveryConfig, Settings
from gateway.discovery.kubernetes import dp_size_from_server_info, pod_engine
from gateway.server.app import create_app
from gateway.server.state import GatewayState
from gateway.serving import serve_in_background
from gateway.sim.cluster import SimulatedEngine, simulated_engines
from tests.helpers import MODEL, eventually, total

NAMESPACE = "llm"
SELECTOR = "app.kubernetes.io/component=engine"


def pod(name: str, port: int, *, ready: bool, version: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Pod as the API server answers it (the fields a kubelet-run pod carries, trimmed of the irrelevant ones)."""
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-12-07T10:00:00Z"},
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": "2026-12-07T10:00:05Z"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-07T10:00:00Z"},
        ],
        "hostIP": "10.0.0.7",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": "2026-12-07T10:00:00Z",
        "containerStatuses": [
            {
                "name": "engine",
                "ready": ready,
                "restartCount": 0,
                "image": "lmsysorg/sglang:v0.5.23",
                "imageID": "docker.io/lmsysorg/sglang@sha256:" + "0" * 64,
                "started": True,
                "state": {"running": {"startedAt": "2026-12-07T10:00:01Z"}},
            }
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "resourceVersion": str(version),
            "creationTimestamp": "2026-12-07T10:00:00Z",
            "labels": {"app.kubernetes.io/component": "engine", **(labels or {})},
            "annotations": {"sbs-gateway/models": MODEL, "sbs-gateway/port": str(port)},
        },
        "spec": {
            "containers": [{"name": "engine", "image": "lmsysorg/sglang:v0.5.23", "ports": [{"containerPort": port}]}],
            "nodeName": "node-1",
            "serviceAccountName": "default",
        },
        "status": status,
    }


@dataclass
class FakeApiServer:
    """Answers ``GET /api/v1/namespaces/{ns}/pods``: a list (``pods`` at ``version``), or a watch that streams the
    events put in ``events`` (``"GONE"`` answers an ERROR event with a 410 Status and ends the watch)."""

    pods: list[dict[str, Any]]
    version: int
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    lists: int = 0
    watches: list[str] = field(default_factory=list)
    selectors: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self.pods_route)
        return app

    async def pods_route(self, request: web.Request) -> web.StreamResponse:
        assert request.match_info["namespace"] == NAMESPACE
        self.selectors.add(request.query.get("labelSelector", ""))
        if request.query.get("watch") not in ("true", "True", "1"):
            self.lists += 1
            body = {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": self.pods,
            }
            return web.json_response(body)
        self.watches.append(request.query.get("resourceVersion", ""))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:
            event = await self.events.get()
            if event == "GONE":
                status = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": "too old resource version: 5 (80)",
                    "reason": "Expired",
                    "code": 410,
                }
                await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                return response
            await response.write(json.dumps(event).encode() + b"\n")


@contextlib.asynccontextmanager
async def aiohttp_server(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yield its URL."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp keeps the bound sockets there; port 0 is resolved only on them
        assert isinstance(server, asyncio.base_events.Server)
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


@dataclass
class Discovered:
    url: str
    state: GatewayState
    api: FakeApiServer
    ports: dict[str, int]


@contextlib.asynccontextmanager
async def discovering() -> AsyncIterator[Discovered]:
    """Simulated engines for pods ``vllm-0`` (vLLM, DP size 2 by label, Ready) and ``sglang-0`` (SGLang, DP size from
    its server info, not Ready yet), the fake API server listing both, and a gateway discovering them."""
    specs = [SimulatedEngine("v", "vllm", 2, MODEL), SimulatedEngine("s", "sglang", 4, MODEL)]
    async with simulated_engines(specs, 20.0) as (v, s):
        ports = {"vllm-0": int(v.url.rsplit(":", 1)[1]), "sglang-0": int(s.url.rsplit(":", 1)[1])}
        vllm_labels = {"sbs-gateway/flavor": "vllm", "sbs-gateway/dp-size": "2", "sbs-gateway/role": "both"}
        api = FakeApiServer(
            [
                pod("vllm-0", ports["vllm-0"], ready=True, version=3, labels=vllm_labels),
                pod("sglang-0", ports["sglang-0"], ready=False, version=4, labels={"sbs-gateway/flavor": "sglang"}),
            ],
            version=5,
        )
        async with aiohttp_server(api.app()) as api_url:
            discovery = KubernetesDiscoveryConfig(label_selector=SELECTOR, namespace=NAMESPACE, api_url=api_url)
            settings = Settings.model_validate(
                {"policy": "round_robin", "discovery": discovery.model_dump(), "health": {"probe_interval_s": 0.1}}
            )
            app = create_app(settings)
            async with serve_in_background(app) as url:
                state = app.state.gateway
                assert isinstance(state, GatewayState)
                yield Discovered(url, state, api, ports)
                await api.events.put("GONE")  # ends the watch in flight, so the client's thread ends too


def engines_of(state: GatewayState) -> list[tuple[str, str, int]]:
    return [(s.name, s.state, s.dp_size) for s in state.engine_set.list()]


async def test_pods_become_engines_as_they_get_ready_and_leave_as_they_go() -> None:
    async with discovering() as d, httpx.AsyncClient(timeout=30) as http:

        async def listed() -> bool:
            return engines_of(d.state) == [("vllm-0", "ready", 2)]

        await eventually(listed)
        assert d.api.selectors == {SELECTOR}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert (await http.post(d.url + "/v1/chat/completions", json=chat)).status_code == 200

        # the SGLang pod gets ready: added, its DP size read from its server info
        sglang_ready = pod(
            "sglang-0", d.ports["sglang-0"], ready=True, version=6, labels={"sbs-gateway/flavor": "sglang"}
        )
        await d.api.events.put({"type": "MODIFIED", "object": sglang_ready})

        async def both() -> bool:
            return engines_of(d.state) == [("vllm-0", "ready", 2), ("sglang-0", "ready", 4)]

        await eventually(both)

        # the vLLM pod stops being ready: drained and removed (nothing is in flight there)
        vllm_labels = {"sbs-gateway/flavor": "vllm", "sbs-gateway/dp-size": "2"}
        vllm_unready = pod("vllm-0", d.ports["vllm-0"], ready=False, version=7, labels=vllm_labels)
        await d.api.events.put({"type": "MODIFIED", "object": vllm_unready})

        async def only_sglang() -> bool:
            return engines_of(d.state) == [("sglang-0", "ready", 4)]

        await eventually(only_sglang)

        # the watch's version expired: 410 Gone, the client lists again, and the list is the truth: the vLLM pod is
        # back and ready, the SGLang pod gone
        d.api.pods = [pod("vllm-0", d.ports["vllm-0"], ready=True, version=9, labels=vllm_labels)]
        d.api.version = 9
        await d.api.events.put("GONE")

        async def relisted() -> bool:
            return d.api.lists >= 2 and engines_of(d.state) == [("vllm-0", "ready", 2)]

        await eventually(relisted)
        assert d.api.watches[0] == "5"  # the first watch resumed from the first list's version

        # a pod deleted
        await d.api.events.put({"type": "DELETED", "object": d.api.pods[0]})

        async def none_left() -> bool:
            return engines_of(d.state) == []

        await eventually(none_left)
        text = (await http.get(d.url + "/metrics")).text
        assert total(text, "gateway_engine_changes_total", change="added", source="discovery") == 3
        assert total(text, "gateway_engine_changes_total", change="removed", source="discovery") == 3


def test_a_pod_is_read_by_its_labels_and_annotations() -> None:
    config = KubernetesDiscoveryConfig(label_selector=SELECTOR, models=["fallback"])
    labels = {"sbs-gateway/flavor": "vllm", "sbs-gateway/role": "decode", "sbs-gateway/kv-connector": "nixl"}
    found = pod_engine(pod("d-0", 8000, ready=True, version=1, labels={**labels, "sbs-gateway/dp-size": "8"}), config)
    assert found.entry == {
        "name": "d-0",
        "flavor": "vllm",
        "url": "http://127.0.0.1:8000",
        "role": "decode",
        "models": [MODEL],
        "kv_connector": "nixl",
        "dp_size": "8",
    }
    assert pod_engine(pod("d-1", 8000, ready=False, version=1, labels=labels), config).ready is False
    deleting = pod("d-2", 8000, ready=True, version=1, labels=labels)
    deleting["metadata"]["deletionTimestamp"] = "2026-12-07T11:00:00Z"
    assert pod_engine(deleting, config).ready is False
    no_flavor = pod_engine(pod("d-3", 8000, ready=True, version=1), config)
    assert no_flavor.entry is None and no_flavor.problem is not None and "sbs-gateway/flavor" in no_flavor.problem
    bad_role = pod_engine(pod("d-4", 8000, ready=True, version=1, labels={**labels, "sbs-gateway/role": "x"}), config)
    assert bad_role.entry is None


def test_the_dp_size_is_read_from_each_flavours_server_info() -> None:
    assert dp_size_from_server_info("sglang", json.dumps({"dp_size": 8, "tp_size": 8})) == 8
    vllm = {"vllm_config": {"parallel_config": {"data_parallel_size": 4}}}
    assert dp_size_from_server_info("vllm", json.dumps(vllm)) == 4
    assert dp_size_from_server_info("vllm", json.dumps({"vllm_config": "VllmConfig(...)"})) is None
    assert dp_size_from_server_info("sglang", "<html>") is None
