"""What the online correction of the prompt-token estimate recovers, in virtual time.

sbs under the ``realistic-sglang`` preset (SGLang as shipped, 30% of requests not streamed, 2 ms + up to 1 ms
dispatch latency) on three traces, with the gateway's estimate off by each of three errors, without and with
``InformationLimits.online_correction`` (the correction the live gateway learns from the engines' reported
``usage.prompt_tokens``, :class:`gateway.tokens.PromptTokenCorrection`); exact counts as the reference:

- ``chat``: the four-characters estimate against DeepSeek-V3's tokenizer on chat requests (the preset's own,
  ``bench/results/token_estimate_error.md``: 4% low, sigma 0.06);
- ``chinese``: on Chinese text (2.35 times low);
- ``x2 over``: every prompt estimated at twice its count (the review's overestimate case), sigma 0.06.

    .venv/bin/python bench/online_correction.py    # writes bench/results/online_correction.{json,md}
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
    parser.add_argument("--output", type=Path, default=RESULTS / "online_correction")
    args = parser.parse_args()
    started = time.perf_counter()
    base = preset("realistic-sglang", 8)
    report: dict[str, Any] = {"preset": base.name, "load": args.load, "minutes": args.minutes, "runs": {}}
    md = [
        "# The online correction of the prompt-token estimate, in virtual time",
        "",
        f"sbs, preset `{base.name}`, first {args.minutes:g} minutes of each trace at {args.load:.0%} of capacity "
        "(2 x 8 ranks). Command: `.venv/bin/python bench/online_correction.py`.",
        "",
    ]
    for trace in TRACES:
        work = workload(trace, args.minutes, args.load, 2, 8, 3.0)
        md += [f"## {trace}", "", "| estimate | correction " + HEADER[0], "|---|---" + HEADER[1]]
        for label, error in ERRORS.items():
            for corrected in (False, True) if error is not None else (False,):
                limits = replace(base.limits, estimate_error=error, online_correction=corrected)
                variant = Variant(f"{trace} {label}", "sbs", {}, {"engine": base.engine, "limits": limits})
                summary = run_variant(variant, work)
                key = f"{trace}/{label}/{'on' if corrected else 'off'}"
                report["runs"][key] = summary
                md.append(f"| {label} | {'on' if corrected else 'off'} " + row(summary))
                print(key, f"TTFT mean {summary['ttft_s']['mean']:.3f} s", flush=True)
        md.append("")
    print("\n".join(md))
    write_outputs(args.output, report, md, started)


if __name__ == "__main__":
    main()
