"""Simulated DP+EP engines, in virtual time and over HTTP, and the tools that run the gateway against them.

- :mod:`.engine_defaults`, :mod:`.calibration`, :mod:`.engine_model`: what SGLang and vLLM do by default, the
  engine model's settings (idealised or as shipped) with their published calibration (``docs/design.md`` §5), and
  the pure engine model, whose parts (a rank's state, step composition, admission, prefix cache, prefill alignment,
  FairBatching) are :mod:`.engine`; :mod:`.capacity`: a trace's analytic load on it.
- :mod:`.simulate`: the gateway's own scheduler against engine models, in virtual time; :mod:`.frontdoors`: the
  gateway as several front doors and how they share their view; :mod:`.compare`: one simulation per policy, as
  ``gateway simulate`` and the benchmarks run them; :mod:`.information`: what a real gateway knows;
  :mod:`.presets`: named engine models and information limits (``idealised``, ``realistic-*``) and the prefill-only
  transform; :mod:`.steady_state`: steady-state runs and the maximum sustainable rate; :mod:`.tenants`: traces of
  several tenants and priority classes (a batch tenant flooding an interactive one).
- :mod:`.mock_engine`: the engine model behind each flavour's HTTP API, in real time, with fault injection.
- :mod:`.cluster`: simulated engines and a gateway on loopback (the embedded default, ``gateway stack``, tests).
"""
