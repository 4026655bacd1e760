"""The parts of the simulated DP+EP engine, :class:`gateway.sim.engine_model.EngineModel`, one concern each.

In the order a step uses them:

- :mod:`.rank`: one DP rank's state: its requests, waiting queue and running set, and KV accounting;
- :mod:`.prefill_alignment`: the engines' own prefill alignment (SGLang's PrefillDelayer, vLLM's
  ``--prefill-schedule-interval``): what prefill each rank may run this step;
- :mod:`.composition`: what one rank runs in a step, per ``step_composition`` (idealised, SGLang, vLLM);
- :mod:`.fairbatching`: FairBatching's batch formation, a step bounded by time rather than tokens;
- :mod:`.admission`: when a waiting request may start prefill, and preemption or retraction (idealised, SGLang, vLLM);
- :mod:`.prefix_cache`: a rank's prefix cache of prompt blocks;
- :mod:`.pd`: P/D disaggregation: a prefill rank's held KV, a decode rank's pre-allocation queue and KV transfers.

All are pure and synchronous, configured by :class:`gateway.sim.calibration.EngineModelConfig`, and used only by
the engine model.
"""
