"""Prefix cache: TTFT cold vs cached, a 10-turn chat's per-turn TTFT, decode cost with no hits.

    python benchmarks/prefix_cache.py [--models tinystories-260k qwen2.5-0.5b-random]
        [--lengths 1024 4096] [--turns 10] [--no-mlx-lm]

Per model, in one process:
- the chat pattern: a prompt of L tokens plus a 32-token suffix, cold (first
  time), then the same L tokens with another 32-token suffix (a hit): TTFT of
  both and the ratio cached / cold (targets: <= 0.1 at 1k, <= 0.05 at 4k);
- a conversation of `--turns` turns (each: the whole history, a 16-token
  reply, a new 32-token user message): TTFT per turn, which should stay flat,
  and the last turn's prompt cold for contrast;
- decode tok/s of 4 concurrent distinct prompts with the cache on vs off (no
  hits: the cache's cost when it does not help; target >= 0.98);
- the same chat pattern and conversation through mlx-lm's prompt cache
  (`make_prompt_cache` reused, trimmed to the common prefix as its server does).
Lengths beyond a model's context are cut to fit (tinystories: 512 positions).
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

import ffai_worker  # noqa: F401 - swap in the fast BLAS before mlx loads
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.engine.types import RequestKey
from ffai_worker.native.blas import blas_info

SUFFIX = 32
REPLY = 16
WORDS = "once upon a time there was a little girl named Lily who loved to play outside".split()


def text_ids(engine: Engine, tag: str, length: int) -> list[int]:
    """`length` token ids of story-like text that start with `tag` (so cases share no prefix)."""
    words = [tag, *(WORDS * (length // 4 + 8))]
    return engine.tokenize(" ".join(words))[:length]


def ttft_ms(engine: Engine, ids: list[int], max_tokens: int = 1) -> tuple[float, list[int], int]:
    params = GenerationParameters(temperature=0.0, max_tokens=max_tokens, stop_on_eos=False)
    result = engine.generate(tokens=ids, parameters=params)
    stats = result.stats
    return stats.time_to_first_token_ms, result.generated_tokens, stats.cached_prompt_tokens


def chat_pattern(engine: Engine, length: int) -> dict[str, float]:
    base = text_ids(engine, f"Case{length}", length + 2 * SUFFIX)
    prefix = base[:length]
    cold, _, _ = ttft_ms(engine, prefix + base[length : length + SUFFIX])
    hot, _, cached = ttft_ms(engine, prefix + base[length + SUFFIX :][::-1])
    return {"cold": cold, "hot": hot, "cached": cached}


def conversation(engine: Engine, start: int, turns: int) -> tuple[list[float], list[int]]:
    ids = text_ids(engine, "Chat", start)
    times = []
    for turn in range(turns):
        ms, reply, _ = ttft_ms(engine, ids, REPLY)
        times.append(ms)
        if turn < turns - 1:
            ids = ids + reply + text_ids(engine, f"User{turn}", SUFFIX)
    return times, ids


def decode_rate(
    engine: Engine, tag: str, prompt: int, tokens: int = 64, rows: int = 4
) -> tuple[float, float]:
    """`rows` concurrent requests with distinct prompts: (decode tok/s, tokens per CPU second).

    Each finished request leaves its prompt and reply in the cache (on): that is the cost.

    Tok/s is the rows' mean; CPU time (all threads of this process) counts the whole
    run, prefill included, so it is less at the mercy of other processes on the machine.
    """
    params = GenerationParameters(temperature=0.0, max_tokens=tokens, stop_on_eos=False)
    for i in range(rows):
        ids = text_ids(engine, f"{tag}{i}x", prompt)
        key = RequestKey(b"b", f"{tag}{i}")
        engine.submit(engine.new_request(key, tokens=ids, parameters=params))
    rates = []
    cpu0 = time.process_time()
    while engine.has_work():
        for out in engine.step():
            for chunk in out.chunks:
                if chunk.stats is not None:
                    rates.append(chunk.stats.decode_tokens_per_second)
    return statistics.mean(rates), rows * tokens / (time.process_time() - cpu0)


def decode_cost(engine: Engine) -> None:
    """Decode with the cache on vs off on a workload with no hits, alternating runs."""
    # One engine, its cache bound toggled (0: off), alternating so drift hits both.
    bound = engine.prefix.capacity_bytes
    on_runs: list[tuple[float, float]] = []
    off_runs: list[tuple[float, float]] = []
    for i in range(7):
        for runs, cap in ((on_runs, bound), (off_runs, 0)):
            engine.prefix.capacity_bytes = cap
            runs.append(decode_rate(engine, f"D{cap}x{i}", 32, tokens=48))
    engine.prefix.capacity_bytes = bound
    on, offr = (statistics.median(r[0] for r in runs) for runs in (on_runs, off_runs))
    on_cpu, off_cpu = (statistics.median(r[1] for r in runs) for runs in (on_runs, off_runs))
    print(
        f"   decode, 4 rows, no hits, median of 7: cache on {on:.1f} tok/s, off {offr:.1f},"
        f" ratio {on / offr:.3f}; tokens per CPU second on {on_cpu:.1f}, off {off_cpu:.1f},"
        f" ratio {on_cpu / off_cpu:.3f}"
    )


def mlx_lm_side(folder: Path, lengths: list[int], start: int, turns: int) -> dict[str, Any]:
    """The chat pattern and the conversation through mlx-lm's reusable prompt cache."""
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(folder))
    tokenizer.eos_token_ids = set()
    sampler = make_sampler(temp=0.0)
    engine_tok = Engine.load(folder, config=EngineConfig(prompt_cache_bytes=0))  # same ids

    def run(cache: Any, fed: list[int], ids: list[int], n: int) -> tuple[float, list[int]]:
        """Feed what `cache` (holding `fed`) lacks of `ids`; TTFT ms and the tokens made."""
        common = 0
        while common < min(len(fed), len(ids) - 1) and fed[common] == ids[common]:
            common += 1
        trim_prompt_cache(cache, len(fed) - common)
        t0 = time.perf_counter()
        first, out = None, []
        for r in mlx_lm.stream_generate(
            model, tokenizer, ids[common:], max_tokens=n, sampler=sampler, prompt_cache=cache
        ):
            first = first or time.perf_counter()
            out.append(r.token)
        assert first is not None
        fed[:] = ids + out[:-1]  # the last sampled token is never fed
        return (first - t0) * 1000.0, out

    result: dict[str, Any] = {}
    for length in lengths:
        base = text_ids(engine_tok, f"Case{length}", length + 2 * SUFFIX)
        cache, fed = make_prompt_cache(model), []
        cold, _ = run(cache, fed, base[:length] + base[length : length + SUFFIX], 1)
        hot, _ = run(cache, fed, base[:length] + base[length + SUFFIX :][::-1], 1)
        result[f"chat{length}"] = {"cold": cold, "hot": hot}
    ids = text_ids(engine_tok, "Chat", start)
    cache, fed, times = make_prompt_cache(model), [], []
    for turn in range(turns):
        ms, reply = run(cache, fed, ids, REPLY)
        times.append(ms)
        ids = ids + reply + text_ids(engine_tok, f"User{turn}", SUFFIX)
    result["turns"] = times
    return result


def bench(
    name: str, folder: Path, lengths: list[int], turns: int, peer: bool, decode: bool
) -> None:
    engine = Engine.load(folder)
    off = Engine.load(folder, config=EngineConfig(prompt_cache_bytes=0))
    room = engine.context_length - SUFFIX - 2 * REPLY
    lengths = sorted({min(n, room) for n in lengths})
    print(f"\n== {name} (context {engine.context_length}, BLAS {blas_info()})")
    print(f"   prompt cache bound {engine.prefix.capacity_bytes / 2**20:.0f} MiB")
    # Warm up both, the hit path included: its first chunk at an offset builds kernels.
    chat_pattern(engine, 96)
    ttft_ms(off, text_ids(off, "Warm", 64), 4)
    for length in lengths:
        r = chat_pattern(engine, length)
        print(
            f"   {length}+{SUFFIX} tokens: cold TTFT {r['cold']:.0f} ms, cached {r['hot']:.1f} ms"
            f" ({r['cached']:.0f} cached), ratio {r['hot'] / r['cold']:.3f}"
        )
    start = max(64, min(512, room - turns * (REPLY + SUFFIX) - REPLY))
    turns = min(turns, (room - start - REPLY) // (REPLY + SUFFIX) + 1)  # a small context
    times, last = conversation(engine, start, turns)
    print(f"   {turns}-turn chat from {start} tokens, TTFT per turn (ms):")
    print("     " + " ".join(f"{t:.0f}" for t in times))
    cold_last, _, _ = ttft_ms(off, last)
    print(f"     last turn's {len(last)}-token prompt cold: {cold_last:.0f} ms")
    if decode:
        decode_cost(engine)
    info = engine.info()
    print(
        "   info: "
        + ", ".join(
            f"{k.removeprefix('prompt_cache_')} {v}" for k, v in info.items() if "prompt_cache" in k
        )
    )
    if peer:
        theirs = mlx_lm_side(folder, lengths, start, turns)
        for length in lengths:
            r = theirs[f"chat{length}"]
            print(
                f"   mlx-lm {length}+{SUFFIX}: cold {r['cold']:.0f} ms, cached {r['hot']:.1f} ms,"
                f" ratio {r['hot'] / r['cold']:.3f}"
            )
        print("   mlx-lm turns (ms): " + " ".join(f"{t:.0f}" for t in theirs["turns"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--lengths", nargs="*", type=int, default=[1024, 4096])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode on/off runs")
    args = ap.parse_args()
    for name, folder in model_set(args.models).items():
        bench(name, folder, args.lengths, args.turns, not args.no_mlx_lm, not args.no_decode)


if __name__ == "__main__":
    main()
