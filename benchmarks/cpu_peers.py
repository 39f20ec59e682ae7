"""Our engine vs llama.cpp vs mlx-lm on this CPU: speed, bandwidth use and quality (issue #16).

    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python \
        -e '.[dev,bench]'    # builds llama.cpp from the llama-cpp-python sdist (~25 min, 2 cores)
    python benchmarks/cpu_peers.py [--models tinystories-260k qwen2.5-0.5b-random]
        [--precisions f32 q8 q4] [--tokens N] [--repeats N] [--quick] [--no-mlx] [--mlx-quant]

Optional: never run by CI or `make test`. The build is native (-march=native: llama.cpp
at its best on the measuring machine); NOTES.md says why not the runtime-dispatch
`GGML_CPU_ALL_VARIANTS` build.

Same checkpoints for every peer: each model folder is converted to GGUF by the
`convert_hf_to_gguf.py` shipped inside the installed llama-cpp-python's sdist (fetched
once) at f32 and Q8_0, and Q4_0 by `llama_model_quantize`; files are cached under the
benchmarks cache dir. Precisions: f32; q8 = ours `dtype="q8"` vs Q8_0 vs mlx-lm 8-bit;
q4 = ours `dtype="q4"` vs Q4_0; mlx-lm's own 8/4-bit (`convert -q`, group 32) only with
`--mlx-quant`: MLX's CPU quantized matmul makes those rows take many minutes on the 0.5B.
A peer that cannot load a precision prints "n/a (why)".

Per model and precision, repeats alternate the peers (medians): decode tok/s at batch 1,
aggregate decode tok/s of 8 sequences in one batched step (llama.cpp: one `llama_batch`
with 8 seq_ids per step), prefill tok/s of one 512-token prompt (511 where the context
is 512). llama.cpp gets n_threads=2 (this machine's cores; `--llama-threads`). Ours
runs in this process without the prefix cache; mlx-lm in a child process without our
small-M matmul kernel, as in decode.py. Also: the machine's read bandwidth (two
methods), weight bytes read per decoded token, decode tok/s ÷ (bandwidth ÷ bytes per
token), perplexity of a fixed text and greedy agreement of q8/q4 with f32 (share of
equal positions).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import CACHE, model_set
from peers import LlamaCpp, gguf_file, read_bandwidth

import ffai_worker  # noqa: F401 - swap in the fast BLAS before mlx loads
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine
from ffai_worker.engine.core import EngineConfig
from ffai_worker.engine.types import LOCAL_CLIENT, RequestKey
from ffai_worker.native.blas import blas_info
from ffai_worker.text.tokenizer import Tokenizer

THREADS = 2
BATCH = 8
PROMPT_WORDS = (
    "Once upon a time there was a little girl named Lily who loved to play outside ".split()
)
BATCH_PROMPTS = [
    f"{start} {animal}"
    for start, animal in zip(
        ["Once upon a time there was a little", "The", "Lily and Ben saw a", "One day a"] * 2,
        "cat dog bird fish frog bear duck lion".split(),
        strict=True,
    )
]
GREEDY_PROMPTS = ["Once upon a time", "The little dog wanted to", "Tom and Sue went to the"]
TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. "
    "Lily was very happy. She wanted to share the ball with her friend Tom. Tom was sad "
    'because he lost his toy car. Lily gave Tom the ball and said, "Let\'s play together!" '
    "Tom smiled and they played all day. When the sun went down, they went home. Lily's mom "
    "gave her a big hug. Lily learned that sharing makes everyone happy."
)
MLX_BITS = {"q8": 8, "q4": 4}
Value = float | str  # a figure, or "n/a (why)"


def na(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"n/a ({type(exc).__name__}: {first})"


# -- ours -------------------------------------------------------------------------------
_keys = itertools.count()


def greedy(tokens: int) -> GenerationParameters:
    return GenerationParameters(temperature=0.0, max_tokens=tokens, stop_on_eos=False)


def ours_decode(engine: Engine, ids: list[int], tokens: int) -> float:
    return engine.generate(tokens=ids, parameters=greedy(tokens)).stats.decode_tokens_per_second


def ours_batch(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    """Aggregate tok/s of all prompts decoding together, once every one has its first token."""
    counts: dict[RequestKey, int] = {}
    for ids in prompts:
        key = RequestKey(LOCAL_CLIENT, f"peers-{next(_keys)}")
        engine.submit(engine.new_request(key, tokens=ids, parameters=greedy(tokens)))
        counts[key] = 0
    t0, base = 0.0, -1
    while engine.has_work():
        for out in engine.step():
            counts[out.key] += sum(len(chunk.tokens) for chunk in out.chunks)
        if base < 0 and all(counts.values()):
            t0, base = time.perf_counter(), sum(counts.values())
    return (sum(counts.values()) - base) / (time.perf_counter() - t0)


def ours_prefill(engine: Engine, ids: list[int]) -> float:
    return engine.generate(tokens=ids, parameters=greedy(1)).stats.prefill_tokens_per_second


def ours_tokens(engine: Engine, ids: list[int], tokens: int) -> list[int]:
    return engine.generate(tokens=ids, parameters=greedy(tokens)).generated_tokens


def ours_logprobs(engine: Engine, ids: list[int]) -> list[float]:
    params = GenerationParameters(temperature=0.0, max_tokens=1, prompt_logprobs=True)
    result = engine.generate(tokens=ids, parameters=params)
    assert result.prompt_logprobs is not None
    return result.prompt_logprobs


# -- mlx-lm, in a child process ---------------------------------------------------------
def peer_main(folder: str) -> None:
    """Child process: load mlx-lm once, then answer one JSON line per request."""
    import mlx_lm
    from mlx_lm import batch_generate, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = mlx_lm.load(folder)
    tok.eos_token_ids = set()  # every peer generates exactly `tokens`
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "batch":
            stats = batch_generate(model, tok, req["prompts"], max_tokens=req["tokens"]).stats
            print(json.dumps(stats.generation_tokens / stats.decode_time), flush=True)
            continue
        responses = stream_generate(
            model, tok, req["ids"], max_tokens=req["tokens"], sampler=make_sampler(temp=0.0)
        )
        *_, last = responses
        rate = last.prompt_tps if req["op"] == "prefill" else last.generation_tps
        print(json.dumps(rate), flush=True)


class MlxPeer:
    def __init__(self, folder: Path) -> None:
        env = {**os.environ, "FFAI_SMALL_GEMM": "0"}  # our kernel is part of our engine
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--peer", str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        if not self._ask(None):
            raise RuntimeError(f"mlx-lm could not load {folder}")

    def _ask(self, req: dict | None) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if req is not None:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("mlx-lm child exited")
        return json.loads(line)

    def decode(self, ids: list[int], tokens: int) -> float:
        return float(self._ask({"op": "decode", "ids": ids, "tokens": tokens}))

    def batch(self, prompts: list[list[int]], tokens: int) -> float:
        return float(self._ask({"op": "batch", "prompts": prompts, "tokens": tokens}))

    def prefill(self, ids: list[int]) -> float:
        return float(self._ask({"op": "prefill", "ids": ids, "tokens": 1}))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def mlx_folder(folder: Path, name: str, precision: str) -> Path:
    """mlx-lm's own quantized copy of `folder` (its `convert -q`, group 32), cached."""
    if precision == "f32":
        return folder
    out = CACHE / "mlx" / f"{name}-{precision}"
    if not (out / "config.json").exists():
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(folder)]
        cmd += ["--mlx-path", str(out), "-q", "--q-bits", str(MLX_BITS[precision])]
        done = subprocess.run([*cmd, "--q-group-size", "32"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return out


# -- one model at one precision ---------------------------------------------------------
class Setup:
    """The token ids every peer gets (our tokenizer: the GGUF and mlx-lm vocabularies match)."""

    def __init__(self, folder: Path, tokens: int, prefill: int) -> None:
        tok = Tokenizer.from_folder(folder, {})
        context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
        ids = tok.encode(" ".join(PROMPT_WORDS * (prefill // 4 + 1)))
        self.prompt = ids[:32]
        self.prefill = ids[: min(prefill, context - 1)]
        self.batch = [tok.encode(p) for p in BATCH_PROMPTS[:BATCH]]
        self.greedy = [tok.encode(p) for p in GREEDY_PROMPTS]
        self.text = tok.encode(TEXT)[: context - 1]
        self.tokens = tokens
        self.n_ctx = max(len(self.prefill), len(self.text), BATCH * (32 + tokens)) + 64


def load_peers(
    name: str, folder: Path, precision: str, want_mlx: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    peers: dict[str, Any] = {}
    failed: dict[str, str] = {}
    dtype = None if precision == "f32" else precision
    loaders = {
        "ours": lambda: Engine.load(folder, dtype=dtype, config=EngineConfig(prompt_cache_bytes=0)),
        "llama": lambda: gguf_file(folder, name, precision, CACHE),
        "mlx": lambda: MlxPeer(mlx_folder(folder, name, precision)),
    }
    for peer, load in loaders.items():
        if peer == "mlx" and not want_mlx:
            failed[peer] = "n/a (not run: --no-mlx, or a quantized row without --mlx-quant)"
            continue
        try:
            peers[peer] = load()
        except Exception as exc:
            failed[peer] = na(exc)
    return peers, failed


def timed_rounds(peers: dict[str, Any], s: Setup, repeats: int) -> dict[str, dict[str, Value]]:
    """Medians over `repeats` rounds, each running every peer in turn (drift hits all)."""
    calls = {
        "ours": {
            "b1": lambda e: ours_decode(e, s.prompt, s.tokens),
            "b8": lambda e: ours_batch(e, s.batch, s.tokens),
            "prefill": lambda e: ours_prefill(e, s.prefill),
        },
        "llama": {
            "b1": lambda m: m.generate([s.prompt], s.tokens)[1],
            "b8": lambda m: m.generate(s.batch, s.tokens)[1],
            "prefill": lambda m: m.prefill_tps(s.prefill),
        },
        "mlx": {
            "b1": lambda p: p.decode(s.prompt, s.tokens),
            "b8": lambda p: p.batch(s.batch, s.tokens),
            "prefill": lambda p: p.prefill(s.prefill),
        },
    }
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in peers}
    errors: dict[str, dict[str, str]] = {p: {} for p in peers}
    for metric in ("b1", "b8", "prefill"):
        for peer, obj in peers.items():  # warm-up: traces, first-touch of the weights
            try:
                calls[peer][metric](obj)
            except Exception as exc:
                errors[peer][metric] = na(exc)
        for _ in range(repeats):
            for peer, obj in peers.items():
                if metric not in errors[peer]:
                    samples[peer].setdefault(metric, []).append(calls[peer][metric](obj))
    return {
        p: {**{m: statistics.median(v) for m, v in samples[p].items()}, **errors[p]} for p in peers
    }


def quality(peers: dict[str, Any], s: Setup, greedy_tokens: int) -> dict[str, dict[str, Any]]:
    """Perplexity of TEXT and greedy continuations of GREEDY_PROMPTS, per peer."""
    out: dict[str, dict[str, Any]] = {}
    for peer in ("ours", "llama"):
        if peer not in peers:
            continue
        obj = peers[peer]
        try:
            lp = ours_logprobs(obj, s.text) if peer == "ours" else obj.logprobs(s.text)
            out[peer] = {"ppl": math.exp(-sum(lp) / len(lp))}
        except Exception as exc:
            out[peer] = {"ppl": na(exc)}
        if peer == "ours":
            out[peer]["greedy"] = [ours_tokens(obj, p, greedy_tokens) for p in s.greedy]
        else:
            out[peer]["greedy"] = [obj.generate([p], greedy_tokens)[0][0] for p in s.greedy]
    return out


def bench(name: str, folder: Path, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure for one model at one precision (peers loaded, measured, released)."""
    want_mlx = not args.no_mlx and (precision == "f32" or args.mlx_quant)
    peers, failed = load_peers(name, folder, precision, want_mlx)
    figures: dict[str, Any] = {p: {"error": why} for p, why in failed.items()}
    s = Setup(folder, args.tokens_for(name), args.prefill)
    if "llama" in peers:
        try:
            peers["llama"] = LlamaCpp(peers["llama"], s.n_ctx, BATCH, args.llama_threads)
        except Exception as exc:
            figures["llama"] = {"error": na(exc)}
            del peers["llama"]
    for peer, values in timed_rounds(peers, s, args.repeats).items():
        figures[peer] = values
    for peer, values in quality(peers, s, args.greedy_tokens).items():
        figures[peer].update(values)
    if "ours" in peers:
        figures["ours"]["bytes"] = peers["ours"].model_info.weights_bytes
    if "llama" in peers:
        figures["llama"]["bytes"] = peers["llama"].size_bytes
        peers["llama"].close()
    if "mlx" in peers:
        peers["mlx"].close()
    figures["prefill_len"] = len(s.prefill)
    return figures


# -- the table --------------------------------------------------------------------------
PEERS = ("ours", "llama", "mlx")
NAMES = {"ours": "ours", "llama": "llama.cpp", "mlx": "mlx-lm"}


def cell(v: Value | None, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    return "n/a" if isinstance(v, str) else format(v, spec)


def line(label: str, cells: list[str], note: str = "") -> None:
    print(f"  {label:<20}" + "".join(f" {c:>10}" for c in cells) + f"  {note}")


def row(
    label: str, values: list[Value | None], target: float | None = None, spec: str = ".1f"
) -> None:
    ours, llama = values[0], values[1]
    ratio = ours / llama if isinstance(ours, float) and isinstance(llama, float) else None
    note = ""
    if target is not None:
        met = "met" if ratio is not None and ratio >= target else "NOT met"
        note = f"target >= {target:.1f}x: {met}"
    line(
        label,
        [*(cell(v, spec) for v in values), cell(ratio, ".4f" if spec != ".1f" else ".2f")],
        note,
    )


def get(fig: dict[str, Any], peer: str, key: str) -> Value | None:
    values = fig.get(peer, {})
    return values.get(key, values.get("error"))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def efficiency(fig: dict[str, Any], peer: str, bandwidth: float) -> Value | None:
    """Decode tok/s at batch 1 ÷ (bandwidth ÷ weight bytes read per token)."""
    rate, size = get(fig, peer, "b1"), fig.get(peer, {}).get("bytes")
    if not isinstance(rate, float) or not size:
        return rate
    return rate * size / (bandwidth * 1e9)


def report(name: str, precision: str, fig: dict[str, Any], bandwidth: float, base) -> None:
    print(f"\n{name} {precision}")
    line("", [*(NAMES[p] for p in PEERS), "ours/llama"])
    row("decode b1 tok/s", [get(fig, p, "b1") for p in PEERS], 1.0)
    row(f"decode b{BATCH} agg tok/s", [get(fig, p, "b8") for p in PEERS], 1.5)
    row(f"prefill {fig['prefill_len']} tok/s", [get(fig, p, "prefill") for p in PEERS], 1.0)
    mb = [fig.get(p, {}).get("bytes") for p in ("ours", "llama")]
    row("weights MB/token", [b / 1e6 if b else None for b in mb])
    eff = [efficiency(fig, p, bandwidth) for p in ("ours", "llama")]
    note = ""
    if precision in ("f32", "q8"):
        met = "met" if isinstance(eff[0], float) and eff[0] >= 0.7 else "NOT met"
        note = f"target ours >= 70%: {met}"
    line("b1 % of bandwidth", [cell(e, ".0%") for e in eff], note)
    row("perplexity (text)", [get(fig, "ours", "ppl"), get(fig, "llama", "ppl")], spec=".4g")
    if base is not None and precision != "f32":
        agree = []
        for peer in ("ours", "llama"):
            a, b = fig.get(peer, {}).get("greedy"), base.get(peer, {}).get("greedy")
            agree.append(f"{agreement(a, b):.0%}" if a and b else "-")
        line("greedy same as f32", agree)
    for p in PEERS:  # why each n/a above
        for why in sorted({v for v in fig.get(p, {}).values() if isinstance(v, str)}):
            print(f"    {NAMES[p]}: {why}")


# -- main -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--precisions", nargs="*", default=["f32", "q8", "q4"])
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens (default per model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, fewer tokens")
    ap.add_argument("--no-mlx", action="store_true", help="skip mlx-lm")
    ap.add_argument("--llama-threads", type=int, default=THREADS, help="llama.cpp's n_threads")
    ap.add_argument(
        "--mlx-quant", action="store_true", help="mlx-lm's q8/q4 too (slow: MLX's CPU q-matmul)"
    )
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run as the mlx-lm child
    args = ap.parse_args()
    if args.peer:
        peer_main(args.peer)
        return
    defaults = {"tinystories-260k": 128, "qwen2.5-0.5b-random": 32}
    scale = 2 if args.quick else 1
    args.repeats = 1 if args.quick else args.repeats
    args.prefill = 512
    args.greedy_tokens = 32 if args.quick else 64
    args.tokens_for = lambda name: args.tokens or defaults.get(name, 64) // scale
    print(f"uptime: {os.popen('uptime').read().strip()}")
    bw = read_bandwidth(THREADS)
    bandwidth = max(bw.values())
    print("read bandwidth, 2 threads: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    print(f"ours: BLAS {blas_info()}")
    print(f"llama.cpp: n_threads={args.llama_threads} (machine: {THREADS} cores), KV f16")
    for name, folder in model_set(args.models).items():
        base = None
        for precision in args.precisions:
            fig = bench(name, folder, precision, args)
            base = fig if precision == "f32" else base
            report(name, precision, fig, bandwidth, base)
    print(f"\nuptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
