"""What the gateway's remedies for a wrong prompt-token estimate recover, in virtual time.

sbs under the ``realistic-sglang`` preset (SGLang as shipped, 30% of requests not streamed, 2 ms + up to 1 ms
dispatch latency) on three traces, with the gateway's estimate off by each of three errors, and four ways to live
with it (exact counts as the reference):

- ``none``: the estimate as drawn;
- ``correction``: ``InformationLimits.online_correction``, the factor the live gateway learns from the engines'
  reported ``usage.prompt_tokens`` (:class:`gateway.tokens.PromptTokenCorrection`);
- ``/v1/loads``: ``SimConfig.engine_queued_tokens``, each scrape carries the engine's own count of every rank's
  queued prefill tokens, which the load view takes as the truth (SGLang's ``GET /v1/loads``,
  :mod:`gateway.load.view`);
- ``both``.

Errors:

- ``chat``: the four-characters estimate against DeepSeek-V3's tokenizer on chat requests (the preset's own,
  ``bench/results/token_estimate_error.md``: 4% low, sigma 0.06);
- ``chinese``: on Chinese text (2.35 times low);
- ``x2 over``: every prompt estimated at twice its count (the review's overestimate case), sigma 0.06.

Last, on Mooncake with the preset's estimate, ``none`` against ``/v1/loads`` with the phase-aware allocator's
long-prefill isolation off (``allocator.long_prefill_tokens: null``): the isolation takes a rank's queued tokens
above its threshold as the sign of a long prompt in prefill, which the engine's figure of what is left stops
giving halfway through such a prompt.

    .venv/bin/python bench/token_count_remedies.py    # writes bench/results/token_count_remedies.{json,md}
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _harness import RESULTS
from _simbench import HEADER, Variant, row, run_variant, workload, write_outputs

from gateway.sim.information import TokenEstimateError, measured_estimate_error
from gateway.sim.presets import preset

TRACES = ["azure-conv", "mooncake-conv", "azure-code"]
REMEDIES = {"none": (False, False), "correction": (True, False), "/v1/loads": (False, True), "both": (True, True)}
"""Remedy → (online correction, engine's queued tokens)."""
ERRORS: dict[str, TokenEstimateError | None] = {
    "exact": None,
    "chat": measured_estimate_error("chat"),
    "chinese": measured_estimate_error("chinese"),
    "x2 over": TokenEstimateError(-math.log(2), 0.058),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="slice of each trace, minutes [10]")
    parser.add_argument("--load", type=float, default=0.8, help="offered load, fraction of capacity [0.8]")
    parser.add_argument("--output", type=Path, default=RESULTS / "token_count_remedies")
    args = parser.parse_args()
    started = time.perf_counter()
    base = preset("realistic-sglang", 8)
    report: dict[str, Any] = {"preset": base.name, "load": args.load, "minutes": args.minutes, "runs": {}}
    md = [
        "# Remedies for a wrong prompt-token estimate, in virtual time",
        "",
        f"sbs, preset `{base.name}`, first {args.minutes:g} minutes of each trace at {args.load:.0%} of capacity "
        "(2 x 8 ranks). Command: `.venv/bin/python bench/token_count_remedies.py`.",
        "",
    ]
    for trace in TRACES:
        work = workload(trace, args.minutes, args.load, 2, 8, 3.0)
        md += [f"## {trace}", "", "| estimate | remedy " + HEADER[0], "|---|---" + HEADER[1]]
        for label, error in ERRORS.items():
            for remedy, (corrected, engine_counts) in REMEDIES.items():
                if error is None and remedy != "none":
                    continue
                limits = replace(base.limits, estimate_error=error, online_correction=corrected)
                sim = {"engine": base.engine, "limits": limits, "engine_queued_tokens": engine_counts}
                summary = run_variant(Variant(f"{trace} {label} {remedy}", "sbs", {}, sim), work)
                key = f"{trace}/{label}/{remedy}"
                report["runs"][key] = summary
                md.append(f"| {label} | {remedy} " + row(summary))
                print(key, f"TTFT mean {summary['ttft_s']['mean']:.3f} s", flush=True)
        md.append("")
    work = workload("mooncake-conv", args.minutes, args.load, 2, 8, 3.0)
    md += [
        "## mooncake-conv, long-prefill isolation off",
        "",
        "| estimate | remedy " + HEADER[0],
        "|---|---" + HEADER[1],
    ]
    for remedy in ("none", "/v1/loads"):
        sim = {"engine": base.engine, "limits": base.limits, "engine_queued_tokens": remedy != "none"}
        settings = {"allocator": {"long_prefill_tokens": None}}
        summary = run_variant(Variant(f"isolation off {remedy}", "sbs", settings, sim), work)
        report["runs"][f"mooncake-conv/chat/{remedy}/isolation off"] = summary
        md.append(f"| chat | {remedy} " + row(summary))
    print("\n".join(md))
    write_outputs(args.output, report, md, started)


if __name__ == "__main__":
    main()
