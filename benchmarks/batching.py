"""Aggregate decode throughput of N concurrent served clients vs mlx-lm's batch_generate.

    python benchmarks/batching.py [--models ...] [--clients 1 2 4 8 16] [--tokens N]

For each model it starts a real worker process, runs N client processes that
each stream one generation at once, and reports total generated tokens per
second of wall time (first request sent → last final chunk; the median of
`--repeats` rounds alternating with mlx-lm's), after one
untimed warm-up round at that batch size (a new batch shape traces new
compiled decode steps once; a long-running worker has them). mlx-lm's
`batch_generate` runs the same N prompts and token counts in this process,
after its own warm-up, on the same OpenBLAS but without the worker's
small-M matmul kernel (part of our engine, not mlx-lm's; `--peer-kernel`
gives it to mlx-lm too).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import model_set

PROMPTS = [
    "Once upon a time there was a little {}",
    "The {} went to the park",
    "Lily and Ben saw a {}",
    "One day a {} found a box",
]
ANIMALS = "cat dog bird fish frog bear duck lion owl fox cow pig hen ant bee rat".split()


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)].format(ANIMALS[i % len(ANIMALS)]) for i in range(n)]


def _client(endpoint: str, prompt: str, tokens: int, start: mp.Event, out: mp.Queue) -> None:
    from ffai_client import Client, GenerationParameters

    params = GenerationParameters(temperature=0.0, max_tokens=tokens, stop_on_eos=False)
    with Client(endpoint, timeout=120) as client:
        client.ping()
        start.wait()
        result = client.generate(prompt, parameters=params)
    out.put(len(result.generated_tokens))


def served(endpoint: str, n: int, tokens: int) -> float:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(endpoint, p, tokens, start, out)) for p in prompts(n)
    ]
    for proc in procs:
        proc.start()
    time.sleep(1.0 + 0.1 * n)  # let every client connect and ping
    t0 = time.perf_counter()
    start.set()
    total = sum(out.get(timeout=600) for _ in procs)
    elapsed = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    return total / elapsed


def mlx_lm_batch(folder: Path, n: int, tokens: int, cache: dict) -> float:
    import mlx_lm
    from mlx_lm import batch_generate

    import ffai_worker  # noqa: F401 - same BLAS as the worker

    if "model" not in cache:
        cache["model"], cache["tok"] = mlx_lm.load(str(folder))
        cache["tok"].eos_token_ids = set()
    model, tok = cache["model"], cache["tok"]
    ids = [tok.encode(p) for p in prompts(n)]
    batch_generate(model, tok, ids[:1], max_tokens=4)  # warm-up
    t0 = time.perf_counter()
    batch_generate(model, tok, ids, max_tokens=tokens)
    elapsed = time.perf_counter() - t0
    # With no EOS every sequence runs exactly `tokens` steps.
    return n * tokens / elapsed


def start_worker(
    folder: Path, max_batch: int, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='ffai-bench-')}/w.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ffai_worker.cli",
            "serve",
            "--model",
            str(folder),
            "--endpoint",
            endpoint,
            "--max-batch",
            str(max_batch),
        ],
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"serving on" in line:
            # Keep draining its log so a chatty worker never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, endpoint
    raise RuntimeError("worker failed to start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--clients", nargs="*", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians")
    ap.add_argument("--peer-kernel", action="store_true", help="give mlx-lm our kernel too")
    args = ap.parse_args()
    worker_env = dict(os.environ)
    if not args.peer_kernel:
        os.environ["FFAI_SMALL_GEMM"] = "0"  # this process runs mlx-lm
    from ffai_worker.native.blas import blas_info

    print(f"mlx-lm (this process) BLAS: {blas_info()}")
    defaults = {"tinystories-260k": 200, "qwen2.5-0.5b-random": 24}
    for name, folder in model_set(args.models).items():
        tokens = args.tokens or defaults.get(name, 64)
        proc, endpoint = start_worker(folder, max(args.clients), worker_env)
        cache: dict = {}
        base = None
        print(f"\n{name}: {tokens} tokens per client")
        print(
            f"{'clients':>7} | {'served tok/s':>12} | {'x one':>6} | "
            f"{'mlx-lm tok/s':>12} | {'ratio':>5}"
        )
        try:
            for n in args.clients:
                served(endpoint, n, tokens)  # warm-up: traces for this batch size
                # Alternate, so the machine's drift hits both sides alike.
                rounds = [
                    (served(endpoint, n, tokens), mlx_lm_batch(folder, n, tokens, cache))
                    for _ in range(args.repeats)
                ]
                ours = statistics.median(r[0] for r in rounds)
                theirs = statistics.median(r[1] for r in rounds)
                base = base or ours
                print(
                    f"{n:>7} | {ours:>12.1f} | {ours / base:>6.2f} | "
                    f"{theirs:>12.1f} | {ours / theirs:>5.2f}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
