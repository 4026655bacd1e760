"""Workloads, shared by the replay client, the simulator and the benchmarks.

- :mod:`.traces`: production traces (Azure 2023 conversation and code, Mooncake) read into
  :class:`~gateway.workload.traces.TraceRequest` lists, sliced and rescaled in rate.
- :mod:`.stats`: the distributions (mean and percentiles) every report prints.
"""
