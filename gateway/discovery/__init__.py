"""Engines found at runtime rather than listed in the configuration file.

- :mod:`.kubernetes`: engine pods by label selector (``discovery`` section), with the official Kubernetes client;
  what it finds goes to the engine set (:mod:`gateway.engine_set`) as changes of source ``discovery``.
"""
