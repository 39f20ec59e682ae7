"""Decode and prefill speed: our engine vs mlx-lm's stream_generate, same checkpoints, one process.

    python benchmarks/decode.py [--models tinystories-260k qwen2.5-0.5b-random] [--tokens N]

Prints prompt tok/s and decode tok/s for both and the ratios ours ÷ mlx-lm,
plus which BLAS ran (both engines share this process, hence the same BLAS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import model_set

import ffai_worker  # noqa: F401 - swap in the fast BLAS before mlx loads
from ffai_client.types import GenerationParameters
from ffai_worker.blas import blas_info
from ffai_worker.engine import Engine

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


def bench(name: str, folder: Path, prompt_len: int, tokens: int, repeats: int) -> dict[str, float]:
    import mlx_lm

    engine = Engine.load(folder)
    model, tokenizer = mlx_lm.load(str(folder))
    tokenizer.eos_token_ids = set()  # both engines generate exactly `tokens`
    prompt_ids = make_prompt_ids(engine, prompt_len)
    ours(engine, prompt_ids, 8)
    theirs(model, tokenizer, prompt_ids, 8)  # warm-up both
    rows: dict[str, list[float]] = {"op": [], "od": [], "tp": [], "td": []}
    for _ in range(repeats):  # interleave so drift hits both equally
        p, d = ours(engine, prompt_ids, tokens)
        rows["op"].append(p)
        rows["od"].append(d)
        p, d = theirs(model, tokenizer, prompt_ids, tokens)
        rows["tp"].append(p)
        rows["td"].append(d)
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
    args = ap.parse_args()
    print(f"BLAS: {blas_info()}")
    settings = {"tinystories-260k": (128, 256), "qwen2.5-0.5b-random": (256, 48)}
    for name, folder in model_set(args.models).items():
        prompt_len, tokens = settings.get(name, (128, 64))
        bench(name, folder, prompt_len, args.tokens or tokens, args.repeats)


if __name__ == "__main__":
    main()
