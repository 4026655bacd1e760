"""Staggered-batch routing gateway for DP+EP LLM engines.

A request's way through the packages: :mod:`gateway.server` (the HTTP front door) → :mod:`gateway.dispatch` (the
asyncio loop) → :mod:`gateway.scheduling` (window, allocators, baselines; pure, time passed in) →
:mod:`gateway.engines` (the engine HTTP client and one adapter per flavour). The load goes the other way:
:mod:`gateway.load` (scraper, load view, health) → the scheduler. Beneath them all: :mod:`gateway.types` (the
vocabulary), :mod:`gateway.tokens`, :mod:`gateway.errors`, :mod:`gateway.config`. Beside them:
:mod:`gateway.sim` (simulated engines, the virtual-time simulator), :mod:`gateway.workload` (traces),
:mod:`gateway.replay` (``gateway bench``) and :mod:`gateway.cli`. ``docs/architecture.md`` walks through it.
"""

__version__ = "0.1.0"
