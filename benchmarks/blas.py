"""Decode and prefill speed of our engine on each BLAS MLX can run on Linux.

    python benchmarks/blas.py [--models tinystories-260k qwen2.5-0.5b-random]
                              [--configs system wheel wheel-nokernel reference] [--tokens N]

Each configuration runs in its own process (the BLAS is chosen before mlx loads):
`system` = a system OpenBLAS, `wheel` = the scipy-openblas32 wheel's OpenBLAS
(what a machine without system packages gets), `-nokernel` = without our small-M
kernel in front, `reference` = the reference BLAS bundled with MLX's wheel. Prints
the BLAS line each process reported and median prompt / decode tok/s; `--matmul`
times single decode- and prefill-shaped products (M x N x K) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import ffai_worker  # noqa: F401 - chooses the BLAS (per FFAI_BLAS) before mlx loads
from ffai_worker.native.blas import blas_info

HERE = Path(__file__).resolve().parent
MATMUL_ONLY = Path("-")
CONFIGS = {
    "system": {"FFAI_BLAS": "system"},
    "system-nokernel": {"FFAI_BLAS": "system", "FFAI_SMALL_GEMM": "0"},
    "wheel": {"FFAI_BLAS": "wheel"},
    "wheel-nokernel": {"FFAI_BLAS": "wheel", "FFAI_SMALL_GEMM": "0"},
    "reference": {"FFAI_BLAS": "off"},
}


def child(folder: str, prompt_len: int, tokens: int, repeats: int) -> None:
    sys.path.insert(0, str(HERE))
    from decode import make_prompt_ids, ours

    from ffai_worker.engine import Engine

    engine = Engine.load(folder)
    prompt_ids = make_prompt_ids(engine, prompt_len)
    ours(engine, prompt_ids, 4)  # warm-up: compile, first allocations
    runs = [ours(engine, prompt_ids, tokens) for _ in range(repeats)]
    prefill = statistics.median(p for p, _ in runs)
    decode = statistics.median(d for _, d in runs)
    print(json.dumps({"blas": blas_info(), "prefill": prefill, "decode": decode}), flush=True)


MATMULS = [(1, 4864, 896), (8, 4864, 896), (1, 151936, 896), (64, 4864, 896), (512, 4864, 896)]


def matmul_child(repeats: int) -> None:
    """Median ms of x (M, K) @ w (N, K)^T for decode- and prefill-shaped float32 products."""
    import time

    import mlx.core as mx  # ffai_worker, imported above, chose the BLAS first

    times = {}
    for m, n, k in MATMULS:
        x, w = mx.random.normal((m, k)), mx.random.normal((n, k))
        mx.eval(x, w, x @ w.T)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(x @ w.T)
            runs.append((time.perf_counter() - start) * 1e3)
        times[f"{m}x{n}x{k}"] = statistics.median(runs)
    print(json.dumps({"blas": blas_info(), "ms": times}), flush=True)


def run(config: str, folder: Path, prompt_len: int, tokens: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FFAI_BLAS", "FFAI_SMALL"))}
    env.update(CONFIGS[config])
    args = [sys.executable, __file__, "--child", str(folder)]
    if folder == MATMUL_ONLY:
        args = [sys.executable, __file__, "--matmul-child"]
    args += ["--prompt", str(prompt_len), "--tokens", str(tokens), "--repeats", str(repeats)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["tinystories-260k", "qwen2.5-0.5b-random"])
    ap.add_argument("--configs", nargs="*", default=["system", "wheel", "reference"])
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens (default per model)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul", action="store_true", help="time single matmuls, no models")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one configuration's process
    ap.add_argument("--matmul-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.matmul_child:
        matmul_child(args.repeats)
        return
    if args.matmul:
        for config in args.configs:
            r = run(config, MATMUL_ONLY, 0, 0, args.repeats)
            shapes = "  ".join(f"{shape} {ms:8.2f} ms" for shape, ms in r["ms"].items())
            print(f"{config:<16} {shapes}  | {r['blas']}", flush=True)
        return
    if args.child:
        child(args.child, args.prompt, args.tokens, args.repeats)
        return
    sys.path.insert(0, str(HERE))
    from models import model_set

    for name, folder in model_set(args.models).items():
        for config in args.configs:
            tokens = args.tokens or (128 if "tinystories" in name else 32)
            repeats = args.repeats
            if config == "reference" and "tinystories" not in name:
                tokens, repeats = min(tokens, 8), 1  # ~30x slower: keep it to a minute
            r = run(config, folder, args.prompt, tokens, repeats)
            print(
                f"{name:<20} {config:<16} prefill {r['prefill']:9.1f} tok/s  "
                f"decode {r['decode']:8.2f} tok/s  | {r['blas']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
