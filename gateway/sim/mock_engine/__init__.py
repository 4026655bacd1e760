"""A simulated SGLang or vLLM DP+EP engine behind an OpenAI-compatible HTTP API, in real time.

Modules, from the socket inward:

- :mod:`.app`: the FastAPI app and its lifespan (``create_mock_engine_app``, ``serve_mock_engine``).
- :mod:`.protocol`: what the engine accepts (rank pinning, request fields, errors), per flavour.
- :mod:`.response`: OpenAI JSON and SSE answers built from the engine model's tokens.
- :mod:`.runtime`: the step loop that runs :class:`~gateway.sim.engine_model.EngineModel` on the wall clock.
- :mod:`.metrics`: the ``/metrics`` exposition each flavour exports, per DP rank.
- :mod:`.faults`: fault injection (``/_sim/faults``) for the resilience tests.

The engine facts here are written independently of :mod:`gateway.engines` on purpose: the mock is an oracle for
the adapters, and deriving both from one constant would hide a typo in either.
"""
