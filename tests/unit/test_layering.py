"""The gateway's import layering: every seam sits below the code that uses it.

:data:`LAYERS` lists the gateway's parts from the bottom up. A module may import its own part and any part of a
lower layer, nothing else: not a higher layer, and not another part of its own layer (so no two parts import
each other, and ``scheduling`` and ``load`` can never form a loop). Every module of ``gateway/`` must belong to
a part. Separately, the scheduling core must load no web framework, HTTP client or Prometheus client.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gateway

PACKAGE_DIR = Path(gateway.__file__).parent

LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"vocabulary": ("gateway.types",)},
    # the immediate-dispatch policies and their registry, from which the configuration takes its policy names
    {"baselines": ("gateway.scheduling.baselines",)},
    {
        "version": ("gateway",),  # the package itself: __version__ only
        "tokens": ("gateway.tokens",),
        "errors": ("gateway.errors",),
        "config": ("gateway.config",),
        "logs": ("gateway.logs",),
        "plots": ("gateway.plots",),
    },
    # the simulated engine: its settings and the pure model with its parts (no simulator, no mock engine, no HTTP)
    {
        "engine model": (
            "gateway.sim.engine_defaults",
            "gateway.sim.calibration",
            "gateway.sim.engine_model",
            "gateway.sim.engine",
        )
    },
    {
        "engines": ("gateway.engines",),
        # the load's pure state (view, health); its asyncio loops are "load monitors" above
        "load state": ("gateway.load",),
        "workload": ("gateway.workload",),
        # a served model's tokenizer and chat template (reads the models settings, builds the prompt counter)
        "tokenizer file": ("gateway.tokenizer_file",),
    },
    {
        "scheduling": ("gateway.scheduling",),
        "telemetry": ("gateway.telemetry",),
        # P/D disaggregation's legs per engine protocol (pure; uses the engines' rank pins)
        "pd": ("gateway.pd",),
    },
    {
        "load monitors": ("gateway.load.engine_loop", "gateway.load.prober", "gateway.load.scraper"),
        "dispatch": ("gateway.dispatch",),
    },
    # the engines at runtime: added, drained and removed across the view, breakers, loops and metrics
    {"engine set": ("gateway.engine_set",)},
    {
        # a front door's side of the scheduler service: its protocol, client and remote dispatcher
        "scheduler service client": ("gateway.scheduler_service",),
        # engines found at runtime (Kubernetes pods), handed to the engine set
        "discovery": ("gateway.discovery",),
    },
    {
        "front door": ("gateway.server",),
        "replay": ("gateway.replay",),
        "simulator": ("gateway.sim",),
        "serving": ("gateway.serving",),
        "config reference": ("gateway.config_reference",),
    },
    {
        "assembly": (
            "gateway.embedded",
            "gateway.sim.cluster",
            "gateway.sim.pd_faults",
            "gateway.stack",
            "gateway.scheduler_service.service",
            "gateway.scheduler_service.supervisor",
        )
    },
    {"command line": ("gateway.cli", "gateway.__main__")},
]
"""Layers from the bottom up; each maps a part's name to its modules and packages (a package holds its
submodules unless a longer entry claims them)."""

SCHEDULING_CORE_FORBIDS = ("prometheus_client", "aiohttp", "httpx", "fastapi", "starlette", "uvicorn")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gateway_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def part_of(module: str) -> tuple[int, str] | None:
    """``(layer index, part name)`` of ``module``: its longest entry in :data:`LAYERS` (the root package entry
    matches only itself)."""
    best: tuple[int, int, str] | None = None
    for layer, parts in enumerate(LAYERS):
        for part, entries in parts.items():
            for entry in entries:
                inside = module == entry or (entry != "gateway" and module.startswith(entry + "."))
                if inside and (best is None or len(entry) > best[0]):
                    best = (len(entry), layer, part)
    return None if best is None else (best[1], best[2])


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The gateway modules ``module`` imports anywhere in its body (lazy and type-checking imports included)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {name for name in found if name == "gateway" or name.startswith("gateway.")}


def layering_violations(modules: dict[str, Path]) -> list[str]:
    known = set(modules)
    violations = []
    for module, path in modules.items():
        source = part_of(module)
        assert source is not None, f"{module} belongs to no part of LAYERS: place it there"
        for target in sorted(imported_modules(module, path, known)):
            destination = part_of(target)
            assert destination is not None, f"{module} imports {target}, which belongs to no part of LAYERS"
            if destination[1] != source[1] and destination[0] >= source[0]:
                where = "a higher layer" if destination[0] > source[0] else "another part of its own layer"
                violations.append(f"{module} ({source[1]}) imports {target} ({destination[1]}, {where})")
    return violations


def test_no_import_runs_against_the_layering() -> None:
    assert layering_violations(gateway_modules()) == []


def test_every_part_of_the_layering_holds_a_module() -> None:
    placed = {part_of(module) for module in gateway_modules()}
    empty = [part for layer, parts in enumerate(LAYERS) for part in parts if (layer, part) not in placed]
    assert empty == [], "parts of LAYERS that match no module (stale entries)"


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The check itself: a load-view module importing the front door, or the scheduler a load monitor, fails."""
    modules = gateway_modules()
    view = tmp_path / "view.py"
    view.write_text(modules["gateway.load.view"].read_text() + "\n\ndef f():\n    from gateway.server import app\n")
    scheduler = tmp_path / "scheduler.py"
    scheduler.write_text("from gateway.load.scraper import MetricsScraper\n")
    modules |= {"gateway.load.view": view, "gateway.scheduling.scheduler": scheduler}
    assert layering_violations(modules) == [
        "gateway.load.view (load state) imports gateway.server.app (front door, a higher layer)",
        "gateway.scheduling.scheduler (scheduling) imports gateway.load.scraper (load monitors, a higher layer)",
    ]


def top_level_packages_loaded_by(imports: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after running ``imports`` in a fresh interpreter."""
    probe = f"import json, sys\n{imports}\nprint(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=PACKAGE_DIR.parent
    )
    return set(json.loads(result.stdout))


SCHEDULING_CORE = """
import importlib, pkgutil
import gateway.load.view, gateway.scheduling, gateway.types
for info in pkgutil.iter_modules(gateway.scheduling.__path__):
    importlib.import_module(f"gateway.scheduling.{info.name}")
"""


def test_the_scheduling_core_loads_no_web_framework_http_client_or_prometheus_client() -> None:
    loaded = top_level_packages_loaded_by(SCHEDULING_CORE)
    assert "gateway" in loaded
    assert loaded & set(SCHEDULING_CORE_FORBIDS) == set()


@pytest.mark.parametrize(
    ("module", "loads"), [("gateway.telemetry", "prometheus_client"), ("gateway.engines.client", "aiohttp")]
)
def test_the_probe_sees_what_a_module_loads(module: str, loads: str) -> None:
    assert loads in top_level_packages_loaded_by(f"import {module}")
