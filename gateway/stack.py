"""The local stack without Docker (``gateway stack``): what docker-compose.yml runs, as one command on loopback.

From the same files as docker-compose.yml (or docker-compose.pd.yml): the gateway configuration
(``deploy/compose/gateway.yaml``, ``gateway-pd.yaml``) gives the engines, each started as a simulated engine of its
flavour, DP size, model and P/D role on a free loopback port (engines and gateway share this process's event loop,
as in the embedded default); the gateway then runs with the same configuration pointed at them (a prefill engine's
bootstrap port too: the simulated engines rendezvous on the prefill's HTTP port). With Prometheus installed (Debian
package ``prometheus``), it starts too, with ``deploy/prometheus/prometheus.yml`` (``prometheus-pd.yml``) and its
rules, each scrape target rewritten to the loopback address of the process that plays it: job ``gateway`` to the
gateway, job ``prometheus`` to Prometheus itself, any other target ``host:port`` to the engine whose configured URL
has that address.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway.config import Settings
from gateway.sim.cluster import NotReady, SimulatedEngine, free_port, running_gateway, simulated_engines, wait_ready

READY_TIMEOUT_S = 30.0
"""How long Prometheus and the gateway's ``/ready`` get to come up, seconds."""
STOP_TIMEOUT_S = 10.0
"""How long Prometheus gets to exit after SIGTERM before it is killed, seconds."""


class StackError(RuntimeError):
    """The stack cannot start: a file is missing, a scrape target matches no process, or Prometheus failed."""


@dataclass(frozen=True)
class StackUrls:
    """Where the parts of a running stack answer (``http://host:port``, no path)."""

    gateway: str
    engines: dict[str, str]
    prometheus: str | None


def stack_prometheus_config(
    config: Mapping[str, Any],
    *,
    gateway: str,
    prometheus: str,
    engines: Mapping[str, str],
    rules_dir: Path,
    scrape_interval_s: float | None = None,
) -> dict[str, Any]:
    """The stack's Prometheus configuration: ``config`` with every static target moved to loopback.

    Args:
        config: the parsed ``prometheus.yml`` of docker-compose.
        gateway: ``host:port`` the gateway listens on; every target of job ``gateway`` becomes it.
        prometheus: ``host:port`` of Prometheus; every target of job ``prometheus`` becomes it.
        engines: configured engine address (``host:port`` of its URL) → the address it listens on now.
        rules_dir: folder against which relative ``rule_files`` are resolved.
        scrape_interval_s: if given, the global scrape and rule evaluation interval, seconds.

    Raises:
        StackError: a target of another job is no configured engine's address.
    """
    out = dict(config)
    jobs = []
    for job in config.get("scrape_configs", []):
        fixed = {"gateway": gateway, "prometheus": prometheus}.get(job["job_name"])
        groups = []
        for group in job.get("static_configs", []):
            targets = []
            for target in group["targets"]:
                if fixed is None and target not in engines:
                    raise StackError(
                        f"Prometheus job {job['job_name']!r} scrapes {target}, which is no engine of the gateway "
                        f"configuration (engines at {', '.join(sorted(engines))})"
                    )
                targets.append(fixed or engines[target])
            groups.append({**group, "targets": targets})
        jobs.append({**job, "static_configs": groups})
    out["scrape_configs"] = jobs
    out["rule_files"] = [str((rules_dir / p).resolve()) for p in config.get("rule_files", [])]
    if scrape_interval_s is not None:
        interval = f"{round(scrape_interval_s * 1000)}ms"
        out["global"] = {**config.get("global", {}), "scrape_interval": interval, "evaluation_interval": interval}
    return out


def _netloc(url: str) -> str:
    return urlsplit(url).netloc


async def _wait_ready(url: str, what: str, is_alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``url`` until it answers 200; raise :class:`StackError` after :data:`READY_TIMEOUT_S`."""
    try:
        await wait_ready(url, timeout_s=READY_TIMEOUT_S, is_alive=is_alive)
    except NotReady as exc:
        raise StackError(f"{what} did not become ready at {url}") from exc


@contextlib.asynccontextmanager
async def _prometheus(
    binary: str, config: dict[str, Any], host: str, port: int, announce: Callable[[str], None]
) -> AsyncIterator[str]:
    """Run Prometheus with ``config`` (storage in a temporary folder, removed on exit); yield its URL."""
    with tempfile.TemporaryDirectory(prefix="gateway-stack-prometheus-") as tmp:
        config_path = Path(tmp) / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        log_path = Path(tmp) / "prometheus.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={Path(tmp) / 'data'}",
                f"--web.listen-address={host}:{port}",
                "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        url = f"http://{host}:{port}"
        try:
            try:
                await _wait_ready(url + "/-/ready", "Prometheus", lambda: process.returncode is None)
            except StackError as exc:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise StackError(f"{exc}; its log:\n{tail}") from exc
            announce(f"prometheus: {url} (pid {process.pid})")
            yield url
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    process.kill()
                    await process.wait()


@contextlib.asynccontextmanager
async def running_stack(
    settings: Settings,
    *,
    engine_speed: float = 1.0,
    prometheus_config: Path | None = None,
    prometheus_port: int = 9090,
    scrape_interval_s: float | None = None,
    announce: Callable[[str], None] = lambda line: None,
) -> AsyncIterator[StackUrls]:
    """Start the stack; yield where it answers once the gateway is ready (and Prometheus, if asked); stop it.

    Args:
        settings: the gateway's settings; each of ``settings.engines`` is started as a simulated engine of its
            flavour, ``dp_size``, first model, ``role`` and ``kv_connector``, and the gateway listens on
            ``settings.host``/``port``.
        engine_speed: the simulated engines' clock speed (1.0 = real time).
        prometheus_config: docker-compose's ``prometheus.yml``; ``None`` starts no Prometheus.
        prometheus_port: Prometheus' port on ``settings.host`` (0 picks a free one).
        scrape_interval_s: Prometheus' scrape and evaluation interval, overriding the file's, seconds.
        announce: called with one human-readable line per part started.

    Raises:
        StackError: no engines are configured, the Prometheus file or binary is missing, a scrape target matches
            no engine, or a part did not become ready.
    """
    if not settings.engines:
        raise StackError("the gateway configuration lists no engines")
    prometheus_binary = None
    prometheus_file: Any = None
    if prometheus_config is not None:
        prometheus_binary = shutil.which("prometheus")
        if prometheus_binary is None:
            raise StackError("prometheus is not installed (Debian: apt-get install prometheus); or use --no-prometheus")
        try:
            prometheus_file = yaml.safe_load(await asyncio.to_thread(prometheus_config.read_text))
        except OSError as exc:
            raise StackError(f"Prometheus configuration not readable: {exc}") from exc
    host = settings.host
    specs = [
        SimulatedEngine(e.name, e.flavor, e.dp_size, e.models[0], e.role, e.kv_connector) for e in settings.engines
    ]
    async with contextlib.AsyncExitStack() as exits:
        started = await exits.enter_async_context(simulated_engines(specs, engine_speed, host))
        engines = [
            engine.model_copy(update={"url": s.url, "bootstrap_port": s.bootstrap_port, "bootstrap_host": None})
            for engine, s in zip(settings.engines, started, strict=True)
        ]
        for engine in engines:
            kind = engine.flavor if engine.role == "mixed" else f"{engine.flavor} {engine.role}"
            announce(f"engine {engine.name} ({kind}, {engine.dp_size} DP ranks): {engine.url}")
        moved = {
            _netloc(configured.url): _netloc(engine.url)
            for configured, engine in zip(settings.engines, engines, strict=True)
        }
        gateway_settings = settings.model_copy(update={"engines": engines})
        gateway = await exits.enter_async_context(running_gateway(gateway_settings, host=host, port=settings.port))
        await _wait_ready(gateway + "/ready", "the gateway")
        announce(f"gateway ({settings.policy}): {gateway}/v1")
        announce(f"engines at runtime: {gateway}/admin/engines (list; POST to add, .../{{name}}/drain, DELETE)")
        prometheus = None
        if prometheus_config is not None and prometheus_binary is not None:
            port = prometheus_port or free_port(host)
            config = stack_prometheus_config(
                prometheus_file,
                gateway=_netloc(gateway),
                prometheus=f"{host}:{port}",
                engines=moved,
                rules_dir=prometheus_config.parent,
                scrape_interval_s=scrape_interval_s,
            )
            prometheus = await exits.enter_async_context(_prometheus(prometheus_binary, config, host, port, announce))
        yield StackUrls(gateway, {e.name: e.url for e in engines}, prometheus)
