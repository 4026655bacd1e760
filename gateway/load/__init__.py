"""The engines' load and health as the scheduler sees them.

- :mod:`.view`: ``LoadView``, scraped per-rank figures reconciled with the gateway's own dispatches, first tokens
  and finishes; ``snapshot(now)`` gives one ``RankLoad`` per DP rank. Pure state, time passed in.
- :mod:`.live`: ``LiveLoads``, the snapshot of some roles' ranks kept current in place from the ranks the view
  rebuilt, for the immediate policies (one request at a time).
- :mod:`.health`: circuit breakers per engine and per DP rank (``HealthBook``) and retry throttling. Pure state.
- :mod:`.scraper`, :mod:`.prober`: the asyncio loops that read each engine's ``/metrics`` and ``/health`` through
  the :class:`~gateway.engines.client.EngineClient`, one task per engine (:mod:`.engine_loop`).
"""
