"""Decode and prefill speed: our engine vs mlx-lm's stream_generate, same checkpoints, one process.

    python benchmarks/decode.py [--models tinystories-260k qwen2.5-0.5b-random] [--tokens N]

Prints prompt tok/s and decode tok/s for both and the ratios ours ÷ mlx-lm,
plus which BLAS ran. mlx-lm runs in a child process on the same
OpenBLAS but without our small-M matmul kernel (the kernel binds process-wide,
and it is part of our engine, not of mlx-lm); `--peer-kernel` gives mlx-lm the
kernel too, which isolates the engine's own share of the difference. Runs
alternate between the two processes so machine drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import model_set

import ffai_worker  # noqa: F401 - swap in the fast BLAS before mlx loads
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.native.blas import blas_info

PROMPT_WORDS = (
    "Once upon a time there was a little girl named Lily who loved to play outside ".split()
)


def make_prompt_ids(engine: Engine, length: int) -> list[int]:
    ids: list[int] = []
    text = " ".join(PROMPT_WORDS * (length // 4 + 1))
    ids = engine.tokenize(text)[:length]
    return ids


def ours(engine: Engine, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    params = GenerationParameters(temperature=0.0, max_tokens=tokens, stop_on_eos=False)
    stats = engine.generate(tokens=prompt_ids, parameters=params).stats
    return stats.prefill_tokens_per_second, stats.decode_tokens_per_second


def theirs(model, tokenizer, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    last = None
    for response in stream_generate(
        model, tokenizer, prompt_ids, max_tokens=tokens, sampler=make_sampler(temp=0.0)
    ):
        last = response
    assert last is not None and last.generation_tokens == tokens, last
    return last.prompt_tps, last.generation_tps


def peer_main(folder: str) -> None:
    """Child process: load mlx-lm once, then answer one JSON line per run request."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(folder)
    tokenizer.eos_token_ids = set()  # both engines generate exactly `tokens`
    print(json.dumps({"blas": blas_info()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        p, d = theirs(model, tokenizer, req["prompt_ids"], req["tokens"])
        print(json.dumps({"p": p, "d": d}), flush=True)


class Peer:
    def __init__(self, folder: Path, kernel: bool) -> None:
        env = {**os.environ, "FFAI_SMALL_GEMM": os.environ.get("FFAI_SMALL_GEMM", "16")}
        if not kernel:
            env["FFAI_SMALL_GEMM"] = "0"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--peer", str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.blas = self._read()["blas"]

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def run(self, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt_ids": prompt_ids, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return reply["p"], reply["d"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def bench(
    name: str, folder: Path, prompt_len: int, tokens: int, repeats: int, peer_kernel: bool
) -> dict[str, float]:
    # No prefix cache: every repeat sends the same prompt, which would then be a hit
    # (prefill would time one token, not the prompt).
    engine = Engine.load(folder, config=EngineConfig(prompt_cache_bytes=0))
    peer = Peer(folder, peer_kernel)
    print(f"  mlx-lm process BLAS: {peer.blas}")
    prompt_ids = make_prompt_ids(engine, prompt_len)
    ours(engine, prompt_ids, 8)
    peer.run(prompt_ids, 8)  # warm-up both
    rows: dict[str, list[float]] = {"op": [], "od": [], "tp": [], "td": []}
    for _ in range(repeats):  # interleave so drift hits both equally
        p, d = ours(engine, prompt_ids, tokens)
        rows["op"].append(p)
        rows["od"].append(d)
        p, d = peer.run(prompt_ids, tokens)
        rows["tp"].append(p)
        rows["td"].append(d)
    peer.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"{name:<22} prompt {len(prompt_ids):>4} tok | "
        f"prefill ours {med['op']:9.1f} tok/s  mlx-lm {med['tp']:9.1f}  "
        f"ratio {med['op'] / med['tp']:.2f} | "
        f"decode ours {med['od']:8.1f} tok/s  mlx-lm {med['td']:8.1f}  "
        f"ratio {med['od'] / med['td']:.2f}",
        flush=True,
    )
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens (default per model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-kernel", action="store_true", help="give mlx-lm our kernel too")
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run as the mlx-lm child
    args = ap.parse_args()
    if args.peer:
        peer_main(args.peer)
        return
    print(f"BLAS: {blas_info()}")
    settings = {"tinystories-260k": (128, 256), "qwen2.5-0.5b-random": (256, 48)}
    for name, folder in model_set(args.models).items():
        prompt_len, tokens = settings.get(name, (128, 64))
        bench(name, folder, prompt_len, args.tokens or tokens, args.repeats, args.peer_kernel)


if __name__ == "__main__":
    main()
