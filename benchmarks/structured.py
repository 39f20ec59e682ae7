"""Cost of structured output and logprobs on decode throughput, in-process.

    python benchmarks/structured.py [--models tinystories-260k qwen2.5-0.5b-random]
                                    [--batch 1 8] [--tokens 64] [--repeats 3]

For each model and batch size, runs the same greedy requests four ways:
unconstrained, under a JSON-schema constraint (a free string field, so the
grammar never completes before `--tokens`), unconstrained with logprobs=5,
and constrained with logprobs=5, and reports decode tokens per second
(tokens after every row's first, over the wall time from then to the end;
the median of `--repeats` rounds after one warm-up round) and the ratios:
constrained ÷ unconstrained (target >= 0.9) and the logprobs cost
(1 - with ÷ without; target <= 5 %).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import model_set

SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["story", "n"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Ben", "One day a dog"]


def decode_rate(engine: Any, batch: int, tokens: int, **extra: Any) -> float:
    """Decode tok/s of `batch` concurrent greedy requests (after their first tokens)."""
    from ffai_client.types import GenerationParameters
    from ffai_worker.engine.types import RequestKey

    params = GenerationParameters(max_tokens=tokens, temperature=0.0, stop_on_eos=False, **extra)
    for i in range(batch):
        key = RequestKey(b"bench", str(i))
        engine.submit(engine.new_request(key, prompt=PROMPTS[i % 4], parameters=params))
    counts = [0] * batch
    started: float | None = None
    counted = 0
    while engine.has_work():
        for out in engine.step():
            counts[int(out.key.request_id)] += sum(len(c.tokens) for c in out.chunks)
        if started is None and all(counts):
            started, counted = time.perf_counter(), sum(counts)
    assert started is not None
    return (sum(counts) - counted) / (time.perf_counter() - started)


def measure(engine: Any, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "json": {"response_format": FORMAT},
        "plain+lp5": {"logprobs": 5},
        "json+lp5": {"response_format": FORMAT, "logprobs": 5},
    }
    for extra in variants.values():  # warm-up: traces, grammar compile, llguidance tokenizer
        decode_rate(engine, batch, min(tokens, 16), **extra)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
        for name, extra in variants.items():
            rounds[name].append(decode_rate(engine, batch, tokens, **extra))
    return {name: statistics.median(values) for name, values in rounds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["tinystories-260k"])
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ffai_worker  # noqa: F401 - BLAS first
    from ffai_worker.engine import Engine, EngineConfig

    print(
        f"{'model':<22} {'batch':>5} {'plain':>8} {'json':>8} {'json/plain':>10}"
        f" {'plain+lp5':>9} {'lp5 cost':>8} {'json+lp5':>8}"
    )
    for name, folder in model_set(args.models).items():
        engine = Engine.load(folder, config=EngineConfig(max_batch=max(args.batch)))
        for batch in args.batch:
            r = measure(engine, batch, args.tokens, args.repeats)
            print(
                f"{name:<22} {batch:>5} {r['plain']:>8.1f} {r['json']:>8.1f}"
                f" {r['json'] / r['plain']:>10.3f} {r['plain+lp5']:>9.1f}"
                f" {1 - r['plain+lp5'] / r['plain']:>8.1%} {r['json+lp5']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
