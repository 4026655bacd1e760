"""Cost of the front door's prefix block hashes (:func:`gateway.types.prefix_block_hashes`) per request.

Times hashing the text of a chat request whose prompt the gateway estimates at ``--tokens`` tokens (4 characters
a token), the same call the front door makes for every request (``gateway/server/proxy.py``). Prints the median
and the 95th percentile over ``--repeats`` runs, in milliseconds, and the number of blocks.

    python bench/prefix_hash_cost.py --tokens 100000
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time

from gateway.types import prefix_block_hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="prompt size, tokens (4 characters each)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    text = "".join(rng.choice(string.ascii_letters + " ") for _ in range(args.tokens * 4))
    texts = ["system", "You are a helpful assistant.", "user", text]
    timings = []
    blocks = 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        blocks = len(prefix_block_hashes(texts))
        timings.append((time.perf_counter() - start) * 1e3)
    timings.sort()
    p95 = timings[int(0.95 * (len(timings) - 1))]
    print(f"{args.tokens} tokens, {blocks} blocks: median {statistics.median(timings):.3f} ms, p95 {p95:.3f} ms")


if __name__ == "__main__":
    main()
