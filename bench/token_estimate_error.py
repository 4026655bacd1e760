"""How far the gateway's prompt-token estimate is from the engine's count, per kind of text.

The estimate is :func:`gateway.tokens.count_prompt_tokens` (four characters a token); the truth is DeepSeek-V3's
tokenizer (:mod:`gateway.workload.tokenizer`), with the chat template rendered for chat requests as the engine
renders it. The texts are real (``gateway/data/text/README.md`` gives their sources and licences). Chunk sizes
follow the Azure conversation trace's prompt lengths (its estimate, four characters a token, is the trace's
count), capped at half the kind's text. Per kind, the ratio true / estimate is summarised (mean, p5, p50, p95)
and fitted by a lognormal (mu and sigma of its log), the form ``gateway simulate --estimate-error`` draws from.

Kinds:
- ``prose``: English Markdown prose, sent as a ``/v1/completions`` prompt;
- ``code``: Python source, as a prompt;
- ``chat``: ``/v1/chat/completions`` requests of 1 to 8 turns (a system message, then user and assistant turns
  alternating, each a slice of the prose or the code), counted by the engine after DeepSeek-V3's chat template;
- ``chinese``: Chinese prose (simplified and traditional), as a prompt;
- ``multilingual``: Japanese, Korean, Russian, Arabic, Hindi, Spanish, French and German prose, as a prompt.

It also times the replay's prompt synthesis under the tokenizer (``gateway bench --prompts tokenizer``,
:mod:`gateway.replay.prompts`): the one-off preparation and one 100k-token prompt.

    .venv/bin/python bench/token_estimate_error.py    # writes bench/results/token_estimate_error.{json,md}
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from _harness import RESULTS
from _simbench import write_outputs

from gateway.tokens import CHARS_PER_TOKEN, count_prompt_tokens
from gateway.workload.stats import percentile
from gateway.workload.tokenizer import deepseek_tokenizer
from gateway.workload.traces import load_trace, resolve_trace

TEXT = Path(__file__).parent.parent / "gateway" / "data" / "text"
SOURCES = {
    "prose": ["prose_en.md"],
    "code": ["code_python.py.txt"],
    "chinese": ["udhr_zh.txt"],
    "multilingual": ["udhr_multilingual.txt"],
}
KINDS = ["prose", "code", "chat", "chinese", "multilingual"]
MIN_TOKENS = 64
"""Smallest chunk, estimated tokens: below it the rounding of a few characters dominates the ratio."""


def read(kind: str) -> str:
    return "".join((TEXT / name).read_text(encoding="utf-8") for name in SOURCES[kind])


def prompt_sizes(trace: str, n: int, seed: int) -> list[int]:
    """``n`` prompt lengths (tokens) drawn from the trace's prompts."""
    lengths = [r.prompt_tokens for r in load_trace(resolve_trace(trace))]
    rng = random.Random(seed)
    return [max(MIN_TOKENS, rng.choice(lengths)) for _ in range(n)]


def chunk(text: str, n_chars: int, rng: random.Random) -> str:
    """A slice of ``text`` of ``n_chars`` characters from a random start (the text wraps around)."""
    n_chars = min(n_chars, len(text))
    start = rng.randrange(len(text))
    return (text + text)[start : start + n_chars]


def chat_body(sources: list[str], n_chars: int, rng: random.Random) -> dict[str, Any]:
    """A chat request of about ``n_chars`` characters: a system message, then 1 to 8 turns alternating user and
    assistant, ending with a user turn; each message a slice of one of ``sources``."""
    turns = rng.choice([1, 3, 5, 7])
    per = max(1, n_chars // (turns + 1))
    messages = [{"role": "system", "content": chunk(rng.choice(sources), min(per, 2_000), rng)}]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": chunk(rng.choice(sources), per, rng)})
    return {"messages": messages}


def samples(kind: str, sizes: list[int], rng: random.Random) -> list[tuple[int, int]]:
    """``(estimate, true)`` prompt tokens per chunk of ``kind``."""
    tok = deepseek_tokenizer()
    if kind == "chat":
        sources = [read("prose"), read("code")]
        bodies = [chat_body(sources, s * CHARS_PER_TOKEN, rng) for s in sizes]
        return [(count_prompt_tokens(b), tok.count_body(b)) for b in bodies]
    text = read(kind)
    cap = len(text) // 2
    chunks = [chunk(text, min(s * CHARS_PER_TOKEN, cap), rng) for s in sizes]
    return list(zip((count_prompt_tokens({"prompt": c}) for c in chunks), tok.count_texts(chunks), strict=True))


def summarise(pairs: list[tuple[int, int]]) -> dict[str, float]:
    ratios = sorted(t / e for e, t in pairs)
    logs = [math.log(r) for r in ratios]
    return {
        "chunks": len(pairs),
        "estimate_tokens_p50": percentile(sorted(e for e, _ in pairs), 50),
        "mean": statistics.fmean(ratios),
        "p5": percentile(ratios, 5),
        "p50": percentile(ratios, 50),
        "p95": percentile(ratios, 95),
        "lognormal_mu": statistics.fmean(logs),
        "lognormal_sigma": statistics.stdev(logs),
    }


def synthesis_cost(n_tokens: int = 100_000, repeats: int = 200) -> dict[str, float]:
    """Seconds to prepare the replay's prompt synthesis once, and per prompt of ``n_tokens`` tokens."""
    from gateway.replay.prompts import tokenizer_prompts

    deepseek_tokenizer()
    start = time.perf_counter()
    prompts = tokenizer_prompts()
    prepared = time.perf_counter()
    for index in range(repeats):
        prompts.chat_content(index, n_tokens)
    return {
        "prompt_tokens": n_tokens,
        "prepare_s": prepared - start,
        "per_prompt_s": (time.perf_counter() - prepared) / repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=400, help="chunks per kind")
    parser.add_argument("--trace", default="azure-conv", help="trace whose prompt lengths size the chunks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "token_estimate_error")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {"trace": args.trace, "seed": args.seed, "kinds": {}}
    for i, kind in enumerate(KINDS):
        rng = random.Random(args.seed * 1000 + i)
        sizes = prompt_sizes(args.trace, args.chunks, args.seed * 1000 + i)
        report["kinds"][kind] = summarise(samples(kind, sizes, rng))
    md = [
        "# Prompt-token estimate error: DeepSeek-V3's tokenizer over the gateway's estimate",
        "",
        "Ratio true / estimate per chunk (above 1: the gateway underestimates). Chunks sized like the "
        f"`{args.trace}` trace's prompts; chat requests counted after DeepSeek-V3's chat template. Texts and "
        "licences: `gateway/data/text/README.md`. Command: `.venv/bin/python bench/token_estimate_error.py`.",
        "",
        "| kind | chunks | median estimate (tokens) | mean | p5 | p50 | p95 | lognormal mu | lognormal sigma |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, s in report["kinds"].items():
        md.append(
            f"| {kind} | {s['chunks']} | {s['estimate_tokens_p50']:.0f} | {s['mean']:.3f} | {s['p5']:.3f} | "
            f"{s['p50']:.3f} | {s['p95']:.3f} | {s['lognormal_mu']:.3f} | {s['lognormal_sigma']:.3f} |"
        )
    cost = report["replay_synthesis"] = synthesis_cost()
    md += [
        "",
        f"Replay prompt synthesis under the tokenizer (`gateway bench --prompts tokenizer`): prepared once in "
        f"{cost['prepare_s']:.2f} s, then {cost['per_prompt_s'] * 1e3:.3f} ms per {cost['prompt_tokens']:,}-token "
        "prompt (wall clock on the machine that ran this).",
    ]
    print("\n".join(md))
    write_outputs(args.output, report, md, started)


if __name__ == "__main__":
    main()
