"""The scheduler: pure state machines with time passed in, driven alike by the live gateway and the simulator.

In pipeline order:

- :mod:`.scheduler`: ``Scheduler``, the entry point (``submit``, ``poll``, and the progress protocol
  ``on_first_token`` / ``on_tokens`` / ``on_finish`` / ``on_scrape`` that keeps everything below current).
- :mod:`.window`: ``BatchWindow`` buffers requests until it closes; :mod:`.step_aligned_close` can time the close
  just before an instance's predicted step start; :mod:`.step_clock` infers each instance's step phase and step
  time from token arrivals (``docs/design.md`` §3).
- :mod:`.fairness`: with tenants configured, the closed window's batch by priority class, tenants within a class
  in the virtual token counter's order.
- :mod:`.allocators`: the allocator registry, by ``allocator.kind``: :mod:`.phase` (phase-aware placement) and
  :mod:`.allocation` (prefill water-filling), their ties broken by :mod:`.decode` (two objectives, IQR outliers).
  Both place a window with the compiled loops of :mod:`.kernel` (numba), their numpy and Python paths the fallback.
- :mod:`.baselines`: the immediate-dispatch policies and their registry, by ``policy`` name.
- :mod:`.pd`: P/D models' legs: the prefill leg's own policy (``pd.prefill_policy``, ``follow_bootstrap_room``) and
  the decode leg's (``pd.decode_policy``: the decode allocation or a baseline).
- :mod:`.types`: ``Allocation``, what an allocator returns (the shared vocabulary is :mod:`gateway.types`).
"""
