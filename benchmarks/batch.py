"""Throughput of `ffai batch` vs a sequential loop and a hand-written concurrent AsyncClient script.

    python benchmarks/batch.py [--models ...] [--requests N] [--tokens N] [--max-batch B] [--mlx-lm]

For each model it starts a real worker (`--max-batch`, default 16), writes N
greedy completion requests (`ignore_eos`, so each generates exactly
`--tokens`), and times, after one untimed warm-up batch (medians of
`--repeats` alternating rounds; the slow sequential loop runs once):
- `ffai batch` through its Python API (`run_batch`: what the CLI runs), output to a temp file;
- a naive sequential loop, `await client.generate(...)` one request after another;
- `window`: the best plain asyncio script: one AsyncClient, `max_batch + queue` requests in
  flight (a semaphore), the same window `ffai batch` keeps;
- with `--mlx-lm`, mlx-lm's `batch_generate` on the same prompts in this process.
Requests/s and generated tok/s are per wall second (first request sent → last result).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batching import start_worker
from models import model_set

from ffai_client import AsyncClient, GenerationParameters
from ffai_client.batch import in_flight_window, run_batch

SUBJECTS = "cat dog bird fish frog bear duck lion owl fox cow pig hen ant bee rat".split()


def prompts(n: int) -> list[str]:
    return [f"Once upon a time, a {SUBJECTS[i % 16]} number {i} went" for i in range(n)]


def write_input(path: Path, texts: list[str], tokens: int) -> None:
    with path.open("w") as f:
        for i, text in enumerate(texts):
            body = {"prompt": text, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
            f.write(json.dumps(line) + "\n")


def params(tokens: int) -> GenerationParameters:
    return GenerationParameters(max_tokens=tokens, temperature=0.0, stop_on_eos=False)


def ffai_batch(endpoint: str, texts: list[str], tokens: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        write_input(src, texts, tokens)
        t0 = time.perf_counter()
        summary = run_batch(src, out, endpoint=endpoint)
        elapsed = time.perf_counter() - t0  # includes reading and checking the input
    assert summary.ok == len(texts), summary
    return len(texts) / elapsed, summary.completion_tokens / elapsed


async def sequential(endpoint: str, texts: list[str], tokens: int) -> tuple[float, float]:
    async with AsyncClient(endpoint, timeout=60) as client:
        await client.ping()
        t0 = time.perf_counter()
        generated = 0
        for text in texts:
            generated += len(
                (await client.generate(text, parameters=params(tokens))).generated_tokens
            )
        elapsed = time.perf_counter() - t0
    return len(texts) / elapsed, generated / elapsed


async def concurrent(endpoint: str, texts: list[str], tokens: int) -> tuple[float, float]:
    async with AsyncClient(endpoint, timeout=60) as client:
        room = asyncio.Semaphore(in_flight_window((await client.info()).limits))

        async def one(text: str) -> int:
            async with room:
                result = await client.generate(text, parameters=params(tokens))
                return len(result.generated_tokens)

        t0 = time.perf_counter()
        generated = sum(await asyncio.gather(*(one(t) for t in texts)))
        elapsed = time.perf_counter() - t0
    return len(texts) / elapsed, generated / elapsed


def mlx_lm(folder: Path, texts: list[str], tokens: int) -> tuple[float, float]:
    import mlx_lm as lm
    from mlx_lm import batch_generate

    import ffai_worker  # noqa: F401 - same BLAS as the worker

    model, tok = lm.load(str(folder))
    tok.eos_token_ids = set()
    ids = [tok.encode(t) for t in texts]
    batch_generate(model, tok, ids[:2], max_tokens=4)  # warm-up
    t0 = time.perf_counter()
    batch_generate(model, tok, ids, max_tokens=tokens)
    elapsed = time.perf_counter() - t0
    return len(texts) / elapsed, len(texts) * tokens / elapsed


def median(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["tinystories-260k"])
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians")
    ap.add_argument("--mlx-lm", action="store_true", help="also mlx-lm's batch_generate")
    args = ap.parse_args()
    worker_env = dict(os.environ)
    defaults = {"tinystories-260k": (200, 64), "qwen2.5-0.5b-random": (64, 24)}
    for name, folder in model_set(args.models).items():
        n, tokens = defaults.get(name, (64, 32))
        n, tokens = args.requests or n, args.tokens or tokens
        proc, endpoint = start_worker(folder, args.max_batch, worker_env)
        texts = prompts(n)
        try:
            ffai_batch(endpoint, prompts(2 * args.max_batch), tokens)  # warm-up: trace batch shapes
            rounds: dict[str, list[tuple[float, float]]] = {"ffai batch": [], "window": []}
            for _ in range(args.repeats):  # alternating, so the machine's drift hits all alike
                rounds["ffai batch"].append(ffai_batch(endpoint, texts, tokens))
                rounds["window"].append(asyncio.run(concurrent(endpoint, texts, tokens)))
            rows = {label: median(r) for label, r in rounds.items()}
            rows["sequential loop"] = asyncio.run(sequential(endpoint, texts, tokens))
        finally:
            proc.terminate()
            proc.wait()
        if args.mlx_lm:
            rows["mlx-lm batch_generate"] = mlx_lm(folder, texts, tokens)
        print(f"\n{name}: {n} requests x {tokens} tokens, max_batch {args.max_batch}")
        print(f"{'':>22} | {'requests/s':>10} | {'tok/s':>8} | {'batch ÷ it':>10}")
        ours = rows["ffai batch"][1]
        for label, (rps, tps) in rows.items():
            print(f"{label:>22} | {rps:>10.1f} | {tps:>8.0f} | {ours / tps:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
