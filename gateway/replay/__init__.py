"""The trace-replay client of ``gateway bench``: a trace's requests sent at their arrival times, answers measured.

- :mod:`.client`: one streaming OpenAI request per trace request, launched open loop at its arrival offset,
  with a synthesised prompt of the trace's length and the output pinned to the trace's length.
- :mod:`.sse`: incremental decoding of the streamed answers (first token, inter-token gaps).

Traces and the figures computed from the records come from :mod:`gateway.workload`.
"""
