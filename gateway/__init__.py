"""Staggered-batch routing gateway for DP+EP LLM engines."""

__version__ = "0.1.0"
