"""Engines discovered as Kubernetes pods, with the official client (PyPI ``kubernetes``).

Every pod that matches ``discovery.label_selector`` in the namespace is an engine once it is Ready (its ``Ready``
condition true, a pod IP, not being deleted): it is added to the engine set (:mod:`gateway.engine_set`,
source ``discovery``) under the pod's name, at ``http://<pod IP>:<port>``. A pod deleted, or no longer Ready, is
drained and removed once its requests in flight have ended; a pod whose address or settings changed is removed and
added again. Engines from the configuration file are never touched.

What a pod is comes from its labels and annotations, else from the configuration, else from the engine:

- ``sbs-gateway/flavor`` (label): ``sglang`` or ``vllm`` (else ``discovery.flavor``);
- ``sbs-gateway/role`` (label): ``both`` (or ``mixed``), ``prefill`` or ``decode`` (else ``both``);
  ``sbs-gateway/kv-connector`` (label) for vLLM P/D pods;
- ``sbs-gateway/models`` (annotation: model names hold ``/``, which label values may not): comma-separated (else
  ``discovery.models``);
- ``sbs-gateway/port`` (annotation, else ``discovery.port``);
- ``sbs-gateway/dp-size`` (label or annotation), else the engine's own server info, read once it is Ready: SGLang
  ``GET /get_server_info`` answers its server arguments, ``dp_size`` among them (SGLang 0.5.23
  ``http_server.py``, ``get_server_info``); vLLM answers ``GET /server_info?config_format=json`` with its
  ``vllm_config`` (``parallel_config.data_parallel_size``) only when started with ``VLLM_SERVER_DEV_MODE=1``
  (vLLM 0.34 ``entrypoints/serve/instrumentator/server_info.py``, registered in dev mode only), so a vLLM pod
  usually needs the label. A pod whose DP size cannot be read yet is tried again every :data:`RETRY_S`.

The client is synchronous: a daemon thread lists the pods, then watches them from the list's ``resourceVersion``
(each watch asks the server to end after ``discovery.watch_timeout_s`` and is started again from the last version
seen); a watch answered ``410 Gone`` (the version expired) lists again, and a list brings the engine set back to
exactly the pods listed. The thread hands each answer to the event loop, where :class:`KubernetesDiscovery` applies
it. On stop the loop's task ends at once and the thread at its next answer or timeout (it holds no resource of the
loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import HealthConfig, KubernetesDiscoveryConfig
from gateway.engine_set import EngineSet, EngineSetError
from gateway.engines.client import EngineClient
from gateway.errors import UpstreamError

log = logging.getLogger(__name__)

FLAVOR_LABEL = "sbs-gateway/flavor"
ROLE_LABEL = "sbs-gateway/role"
KV_CONNECTOR_LABEL = "sbs-gateway/kv-connector"
DP_SIZE_KEY = "sbs-gateway/dp-size"
MODELS_ANNOTATION = "sbs-gateway/models"
PORT_ANNOTATION = "sbs-gateway/port"
ROLES = {"both": "mixed", "mixed": "mixed", "prefill": "prefill", "decode": "decode"}
"""Role label values and the engine roles they name."""
SERVER_INFO_PATHS = {"sglang": "/get_server_info", "vllm": "/server_info?config_format=json"}
"""Where each flavour reports its DP size (module docstring)."""
SERVER_INFO_MAX_BYTES = 4 * 1024 * 1024
"""Largest server info body read (SGLang's is tens of kilobytes)."""
RETRY_S = 1.0
"""How often a pod that could not be added yet (DP size unread, name still draining) is tried again, seconds."""
BACKOFF_S = (0.5, 30.0)
"""First and longest wait before listing again after the API server failed, seconds (doubled each failure)."""
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where a pod reads its own namespace (Kubernetes' service account volume)."""


@dataclass(frozen=True, slots=True)
class PodEngine:
    """What a pod says about the engine it runs.

    Attributes:
        name: the pod's name (the engine's).
        ready: whether it takes traffic: Ready, with an IP, not being deleted.
        entry: its ``engines`` entry (without ``dp_size`` when the pod does not give it), ``None`` when not ready or
            when it cannot be read (``problem`` says why).
        problem: why a ready pod is no engine, else ``None``.
    """

    name: str
    ready: bool
    entry: dict[str, Any] | None = None
    problem: str | None = None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Whether ``pod`` (a Pod as JSON) takes traffic: its ``Ready`` condition is true, it has a pod IP and is not
    being deleted."""
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    if metadata.get("deletionTimestamp") or not status.get("podIP"):
        return False
    conditions = status.get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_engine(pod: Mapping[str, Any], config: KubernetesDiscoveryConfig) -> PodEngine:
    """The engine ``pod`` (a Pod as JSON) runs, by its labels and annotations and ``config`` (module docstring)."""
    metadata = pod.get("metadata") or {}
    name = str(metadata.get("name", ""))
    if not pod_ready(pod):
        return PodEngine(name, ready=False)
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    flavor = labels.get(FLAVOR_LABEL, config.flavor)
    if flavor not in SERVER_INFO_PATHS:
        return PodEngine(name, True, problem=f"label {FLAVOR_LABEL} is {flavor!r}, not sglang or vllm")
    role = ROLES.get(labels.get(ROLE_LABEL, "both"))
    if role is None:
        return PodEngine(name, True, problem=f"label {ROLE_LABEL} is {labels[ROLE_LABEL]!r}, not both|prefill|decode")
    models = [m.strip() for m in annotations.get(MODELS_ANNOTATION, "").split(",") if m.strip()] or config.models
    if not models:
        return PodEngine(name, True, problem=f"no {MODELS_ANNOTATION} annotation and no discovery.models")
    port = annotations.get(PORT_ANNOTATION, config.port)
    entry: dict[str, Any] = {
        "name": name,
        "flavor": flavor,
        "url": f"http://{_host(pod['status']['podIP'])}:{port}",
        "role": role,
        "models": models,
    }
    if KV_CONNECTOR_LABEL in labels:
        entry["kv_connector"] = labels[KV_CONNECTOR_LABEL]
    dp_size = labels.get(DP_SIZE_KEY, annotations.get(DP_SIZE_KEY))
    if dp_size is not None:
        entry["dp_size"] = dp_size
    return PodEngine(name, True, entry)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def dp_size_from_server_info(flavor: str, text: str) -> int | None:
    """The DP size a ``flavor`` engine's server info body (:data:`SERVER_INFO_PATHS`) gives, ``None`` if it gives
    none."""
    try:
        info = json.loads(text)
        value = info["dp_size"] if flavor == "sglang" else info["vllm_config"]["parallel_config"]["data_parallel_size"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value >= 1 else None


Emit = Callable[[tuple[str, Any]], None]
"""Hands ``("list", [pods])`` or ``("event", (type, pod))`` to the event loop (thread-safe)."""


class PodWatch:
    """The thread's side: list, then watch, the pods (module docstring), handing each answer to ``emit``.

    Args:
        config: the discovery settings.
        emit: thread-safe hand-over to the event loop.
    """

    def __init__(self, config: KubernetesDiscoveryConfig, emit: Emit) -> None:
        self.config = config
        self.emit = emit
        self.stopped = threading.Event()

    def namespace(self) -> str:
        if self.config.namespace is not None:
            return self.config.namespace
        with contextlib.suppress(OSError):
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        return "default"

    def api(self) -> Any:
        """The core API of the configured API server (module docstring)."""
        from kubernetes import client, config

        if self.config.api_url is not None:
            configuration = client.Configuration()
            configuration.host = self.config.api_url
            return client.CoreV1Api(client.ApiClient(configuration))
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        return client.CoreV1Api()

    def run(self) -> None:
        """List and watch until stopped; never raises."""
        from kubernetes.client.exceptions import ApiException

        backoff = BACKOFF_S[0]
        namespace = self.namespace()
        try:
            core = self.api()
        except Exception:
            log.exception("discovery: no Kubernetes API client could be configured")
            return
        while not self.stopped.is_set():
            try:
                version = self._list(core, namespace)
                backoff = BACKOFF_S[0]
                while not self.stopped.is_set():
                    version = self._watch(core, namespace, version)
            except ApiException as exc:
                if exc.status == 410:
                    log.info("discovery: the pods' resourceVersion expired (410 Gone): listing again")
                    continue
                log.warning("discovery: the Kubernetes API answered %s %s; listing again", exc.status, exc.reason)
            except Exception as exc:  # urllib3 and socket errors: the API server is away for now
                log.warning("discovery: the Kubernetes API failed (%s); listing again", exc)
            self.stopped.wait(backoff)
            backoff = min(BACKOFF_S[1], backoff * 2)

    def _list(self, core: Any, namespace: str) -> str:
        answer = core.list_namespaced_pod(
            namespace,
            label_selector=self.config.label_selector,
            _preload_content=False,
            _request_timeout=self.config.watch_timeout_s,
        )
        body = json.loads(answer.data)
        self.emit(("list", body.get("items") or []))
        return str(body["metadata"]["resourceVersion"])

    def _watch(self, core: Any, namespace: str, version: str) -> str:
        """Watch from ``version`` until the server ends the watch; return the last version seen."""
        from kubernetes import watch

        stream: Any = watch.Watch()  # type: ignore[no-untyped-call]
        for event in stream.stream(
            core.list_namespaced_pod,
            namespace,
            label_selector=self.config.label_selector,
            resource_version=version,
            timeout_seconds=int(self.config.watch_timeout_s),
            _request_timeout=self.config.watch_timeout_s + 10,
        ):
            if self.stopped.is_set():
                stream.stop()
                break
            pod = event.get("raw_object") or {}
            self.emit(("event", (str(event.get("type")), pod)))
            version = str((pod.get("metadata") or {}).get("resourceVersion") or version)
        return version


class KubernetesDiscovery:
    """The event loop's side: applies what :class:`PodWatch` sees to the engine set (module docstring).

    Args:
        config: the discovery settings.
        engine_set: the engine set to change.
        client: HTTP client towards the engines (their server info).
        health: probe timeout for the server info reads.
    """

    def __init__(
        self, config: KubernetesDiscoveryConfig, engine_set: EngineSet, client: EngineClient, health: HealthConfig
    ) -> None:
        self.config = config
        self.engine_set = engine_set
        self.client = client
        self.timeout_s = health.probe_timeout_s
        self.known: dict[str, dict[str, Any]] = {}
        """The engines discovery added, by name, with their entries."""
        self.pending: dict[str, PodEngine] = {}
        """Ready pods not added yet (DP size unread, or their name still taken by an engine being removed)."""
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._watch: PodWatch | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the watching thread and the task applying its answers."""
        loop = asyncio.get_running_loop()

        def emit(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

        self._watch = PodWatch(self.config, emit)
        threading.Thread(target=self._watch.run, name="gateway-discovery", daemon=True).start()
        self._task = asyncio.create_task(self._apply_loop(), name="gateway-discovery")

    async def stop(self) -> None:
        """Stop applying (the thread ends at its next answer or timeout)."""
        if self._watch is not None:
            self._watch.stopped.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _apply_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(RETRY_S if self.pending else None):
                    kind, payload = await self._queue.get()
            except TimeoutError:
                for pod in list(self.pending.values()):
                    await self._up(pod)
                continue
            if kind == "list":
                await self.apply_list(payload)
            else:
                await self.apply_event(*payload)

    async def apply_list(self, pods: list[Mapping[str, Any]]) -> None:
        """The pods as listed: add the ready ones not there yet, remove the engines of pods no longer listed or
        ready."""
        seen = [pod_engine(pod, self.config) for pod in pods]
        ready = {p.name for p in seen if p.ready}
        for name in [n for n in [*self.known, *self.pending] if n not in ready]:
            await self._down(name)
        for pod in seen:
            if pod.ready:
                await self._up(pod)

    async def apply_event(self, kind: str, pod: Mapping[str, Any]) -> None:
        """One watch event (``ADDED``, ``MODIFIED``, ``DELETED``) for ``pod``."""
        found = pod_engine(pod, self.config)
        if kind == "DELETED" or not found.ready:
            await self._down(found.name)
        elif kind in ("ADDED", "MODIFIED"):
            await self._up(found)

    async def _up(self, pod: PodEngine) -> None:
        if pod.entry is None:
            if pod.name not in self.known:
                log.warning("discovery: pod %s is no engine: %s", pod.name, pod.problem)
            return
        entry = dict(pod.entry)
        if "dp_size" not in entry:
            dp_size = await self._read_dp_size(entry)
            if dp_size is None:
                self.pending[pod.name] = pod
                return
            entry["dp_size"] = dp_size
        current = self.known.get(pod.name)
        if current == entry:
            self.pending.pop(pod.name, None)
            return
        if current is not None:  # its address or settings changed: out, then in again
            await self._down(pod.name)
        try:
            config = self.engine_set.validate_new(entry)
        except EngineSetError as exc:
            if exc.status == 409 and pod.name in self.engine_set.names_removing():
                self.pending[pod.name] = pod  # its old engine still drains: added once it is gone
            else:
                log.warning("discovery: pod %s not added: %s", pod.name, exc.message)
                self.pending.pop(pod.name, None)
            return
        self.pending.pop(pod.name, None)
        self.known[pod.name] = entry
        await self.engine_set.add(config, "discovery")

    async def _down(self, name: str) -> None:
        self.pending.pop(name, None)
        if self.known.pop(name, None) is None:
            return
        with contextlib.suppress(EngineSetError):  # removed meanwhile by hand
            await self.engine_set.remove(name, "discovery")

    async def _read_dp_size(self, entry: Mapping[str, Any]) -> int | None:
        flavor = str(entry["flavor"])
        url = str(entry["url"]) + SERVER_INFO_PATHS[flavor]
        try:
            text = await self.client.get_text(url, self.timeout_s, SERVER_INFO_MAX_BYTES)
        except UpstreamError as exc:
            log.info("discovery: pod %s: DP size unread (%s); trying again", entry["name"], exc)
            return None
        dp_size = dp_size_from_server_info(flavor, text)
        if dp_size is None:
            log.warning(
                "discovery: pod %s: its server info gives no DP size; label it %s=<n>", entry["name"], DP_SIZE_KEY
            )
        return dp_size
