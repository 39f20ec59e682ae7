"""Where one decode step's time goes: weight products vs everything else, at batch 1 and 8.

    python benchmarks/step_profile.py [--models qwen2.5-0.5b-random] [--batches 1 8] [--rounds 5]
                                      [--context 48]

Per batch size it prints, as medians over `--rounds` alternating rounds (the
dev machine drifts, so every figure of a round is taken back to back):

- step: one steady-state greedy decode step through the real engine
  (`Engine.step`, pipelined as served), and the main thread's CPU time in it;
- forward: the compiled decode forward alone (`BatchedDecoder`, one `mx.eval`);
- products: every Linear of the model plus the (tied) LM head as the same
  matmuls in isolation, M = batch rows, one `mx.eval` (same BLAS and small-M kernel);
- the parts of forward - products timed in isolation, each compiled as the step
  is, for all layers at the step's shapes: norms and residual adds, RoPE, SiLU
  gate, attention with the KV writes, the embedding (where the native kernels run
  the attention, as the decoder does on Linux, RoPE is inside it and shows as 0);
  "rest" is what they leave unexplained (dispatch of the graph's nodes);
- step - forward: the engine's share (sampling, readback, Python), and the
  greedy argmax over the vocabulary in isolation.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The BLAS swap must precede mlx's first import, hence this order.
from models import model_set  # noqa: I001

import ffai_worker  # noqa: F401 - swap in the fast BLAS before mlx loads
import mlx.core as mx
import mlx.nn as nn
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine
from ffai_worker.engine.decoder import BatchedDecoder, attention_width
from ffai_worker.engine.kv_cache import SlotCache
from ffai_worker.engine.types import RequestKey
from ffai_worker.models.cpu_ops import (
    NativeFusedLinear,
    argmax,
    cpu_decode_step,
    scaled_dot_product_attention,
    silu_mul,
)
from ffai_worker.models.quantized import KernelFusedLinear
from ffai_worker.native.quant import native_ops
from ffai_worker.native.blas import blas_info

PROMPT = "Once upon a time there was a little girl named Lily who loved to play outside "
Timer = Callable[[], float]


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `mx.eval(fn())` (the graph is built outside the clock)."""
    times = []
    for _ in range(repeats):
        out = fn()
        t0 = time.perf_counter()
        mx.eval(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class EngineSteps:
    """`batch` greedy requests kept decoding in the real engine; times its steps."""

    def __init__(self, engine: Engine, batch: int, steps: int, context: int) -> None:
        self.engine, self.batch, self.steps = engine, batch, steps
        self.ids = engine.tokenize(PROMPT * (context // 8 + 1))[:context]
        self._serial = 0

    def _submit(self, tokens: int) -> None:
        params = GenerationParameters(temperature=0.0, max_tokens=tokens, stop_on_eos=False)
        for i in range(self.batch):
            self._serial += 1
            key = RequestKey("profile", str(self._serial))
            ids = [*self.ids[:-1], (self.ids[-1] + i) % 200 + 10]  # no prefix-cache sharing
            self.engine.submit(self.engine.new_request(key, tokens=ids, parameters=params))

    def run(self) -> tuple[float, float, int]:
        """(median wall s per step, mean main-thread CPU s per step, attention width)."""
        engine = self.engine
        self._submit(self.steps + 8)
        for _ in range(4):  # prefill, then settle into the pipelined steady state
            engine.step()
        width = attention_width(max(engine.cache.lengths) + 1, engine.cache.capacity)
        walls, cpu = [], 0.0
        for _ in range(self.steps):
            t0, c0 = time.perf_counter(), time.thread_time()
            engine.step()
            walls.append(time.perf_counter() - t0)
            cpu += time.thread_time() - c0
        while engine.has_work():
            engine.step()
        return statistics.median(walls), cpu / self.steps, width


def linears(model: Any) -> list[nn.Module]:
    """Every weight product: Linear layers and fused sibling groups (quantized.project)."""
    kinds = (nn.Linear, nn.QuantizedLinear, KernelFusedLinear, NativeFusedLinear)
    return [m for _, m in model.named_modules() if isinstance(m, kinds)]


def in_dims(m: nn.Module) -> int:
    """A layer's input width (packed quantized weights hold 32 / bits values a word)."""
    width = int(m.weight.shape[1])
    return width * 32 // m.bits if hasattr(m, "bits") else width


def products(model: Any, batch: int) -> Callable[[], list[mx.array]]:
    """Every weight product of one decode step (M = batch), as Linear/as_linear calls."""
    layers = linears(model)
    embed = model.model.embed_tokens
    xs = [mx.random.normal((batch, 1, in_dims(m))) for m in layers]
    head_x = mx.random.normal((batch, 1, in_dims(embed)))
    mx.eval(xs, head_x)
    tied = bool(model.args.tie_word_embeddings)

    def build() -> list[mx.array]:
        outs = []
        for m, x in zip(layers, xs, strict=True):
            out = m(x)  # a fused group returns its members' slices
            outs.extend(out if isinstance(out, list) else [out])
        if tied:
            outs.append(embed.as_linear(head_x))
        return outs

    return build


def forward(model: Any, batch: int, width: int) -> Callable[[], list[mx.array]]:
    """The compiled decode forward over a scratch cache whose rows hold width - 1 tokens."""
    cache = SlotCache(
        model.num_layers, model.n_kv_heads, model.head_dim, mx.float32, max_slots=batch
    )
    for _ in range(batch):
        cache.acquire()
    cache.ensure_capacity(width)
    cache.lengths = [width - 1] * batch
    decoder = BatchedDecoder(model, cache)
    inputs = mx.zeros((batch, 1), dtype=mx.int32)
    idle = [False] * batch  # rows do not advance: every call sees the same width

    def build() -> list[mx.array]:
        return [decoder(inputs, idle), *cache.keys, *cache.values]

    return build


def parts(model: Any, batch: int, width: int) -> dict[str, Callable[[], Any]]:
    """The step's non-product ops for all layers, each compiled on its own."""
    a = model.args
    n, d, heads = model.num_layers, a.hidden_size, a.num_attention_heads
    n_kv, hd = model.n_kv_heads, model.head_dim
    inter = a.intermediate_size
    layer = model.layers[0]
    norm, rope = layer.input_layernorm, layer.self_attn.rope

    def rand(*shape: int) -> list[mx.array]:
        # One input per layer: identical calls on one input would be merged by mx.compile.
        return [mx.random.normal(shape) for _ in range(n)]

    h, h2 = rand(batch, 1, d), rand(batch, 1, d)
    gate, up = rand(batch, 1, inter), rand(batch, 1, inter)
    q, k1 = rand(batch, heads, 1, hd), rand(batch, n_kv, 1, hd)
    kv = [x for _ in range(2) for x in rand(batch, n_kv, width, hd)]
    pos = mx.full((batch,), width - 1, dtype=mx.int32)
    tokens = mx.zeros((batch, 1), dtype=mx.int32)
    logits = mx.random.normal((batch, int(model.args.vocab_size)))
    mx.eval(h, h2, gate, up, q, k1, kv, pos, logits)

    def norms_residuals(h: list[mx.array], h2: list[mx.array]) -> list[mx.array]:
        # Two norms and two residual adds per layer, and the final norm.
        outs = [norm(x + y) for x, y in zip(h, h2, strict=True)]
        outs += [norm(y + x) for x, y in zip(h, h2, strict=True)]
        return [*outs, model.model.norm(h[0])]

    def ropes(q: list[mx.array], k: list[mx.array], pos: mx.array) -> list[mx.array]:
        pairs = zip(q, k, strict=True)
        with cpu_decode_step():  # as in the decode step
            return [r for a, b in pairs for r in (rope(a, offset=pos), rope(b, offset=pos))]

    def silu_gates(g: list[mx.array], u: list[mx.array]) -> list[mx.array]:
        with cpu_decode_step():  # as in the decode step
            return [silu_mul(a, b) for a, b in zip(g, u, strict=True)]

    def attention(
        q: list[mx.array], k1: list[mx.array], pos: mx.array, kv: list[mx.array]
    ) -> tuple[list[mx.array], list[mx.array]]:
        visible = mx.arange(width, dtype=mx.int32)[None, :] <= pos[:, None]
        mask = mx.where(visible, 0.0, float("-inf"))[:, None, None, :]
        index = mx.broadcast_to(pos[:, None, None, None], k1[0].shape)
        outs, new_kv = [], []
        with cpu_decode_step():  # as in the decode step
            for i in range(n):
                k = mx.put_along_axis(kv[i], index, k1[i], axis=2)
                v = mx.put_along_axis(kv[n + i], index, k1[i], axis=2)
                new_kv += [k, v]
                outs.append(scaled_dot_product_attention(q[i], k, v, scale=1.0, mask=mask))
        return outs, new_kv[::2] + new_kv[1::2]

    ext = native_ops()
    if ext is not None:  # as the decoder runs it: RoPE, KV writes and attention natively
        rope_params = rope.native_params()
        q_rows = [x.reshape(batch, 1, -1) for x in q]  # (B, 1, H * Dh)
        k_rows = [x.reshape(batch, 1, -1) for x in k1]

        def native_attention(
            q: list[mx.array], k1: list[mx.array], pos: mx.array, kv: list[mx.array]
        ) -> tuple[list[mx.array], list[mx.array]]:
            outs, new_kv = [], []
            for i in range(n):
                k = ext.kv_write(kv[i], k1[i], pos, **rope_params)
                v = ext.kv_write(kv[n + i], k1[i], pos)
                new_kv += [k, v]
                outs.append(ext.decode_attention(q[i], k, v, pos, **rope_params))
            return outs, new_kv[::2] + new_kv[1::2]

        q, k1 = q_rows, k_rows
        attend = mx.compile(native_attention)
    else:
        attend = mx.compile(attention)

    def attention_step() -> list[mx.array]:
        # Like the decoder: the cache buffers are replaced by the step's outputs, so the
        # KV writes happen in place (donated) instead of copying every buffer.
        outs, kv[:] = attend(q, k1, pos, kv)
        return [*outs, *kv]

    fns = {
        "norms+residuals": (mx.compile(norms_residuals), (h, h2)),
        "rope": (mx.compile(ropes), (q, k1, pos)) if ext is None else (lambda: [], ()),
        "silu*up": (mx.compile(silu_gates), (gate, up)),
        "attention+kv": (attention_step, ()),
        "embedding": (lambda t: model.model.embed_tokens(t), (tokens,)),
        "argmax": (argmax, (logits,)),  # as greedy sampling picks (native on a Linux CPU)
    }
    return {name: (lambda f=f, args=args: f(*args)) for name, (f, args) in fns.items()}


def profile(engine: Engine, batch: int, steps: int, rounds: int, context: int) -> dict[str, float]:
    model = engine.model
    runner = EngineSteps(engine, batch, steps, context)
    runner.run()  # traces and kernels for this batch size
    rows: dict[str, list[float]] = {}
    width = 0
    for _ in range(rounds):
        step, cpu, width = runner.run()
        row = {"step": step, "host cpu": cpu}
        row["forward"] = timed(forward(model, batch, width), 5)
        row["products"] = timed(products(model, batch), 5)
        for name, fn in parts(model, batch, width).items():
            row[name] = timed(fn, 5)
        for key, value in row.items():
            rows.setdefault(key, []).append(value * 1e3)
    med = {key: statistics.median(values) for key, values in rows.items()}
    med["width"] = width
    return med


def report(name: str, batch: int, m: dict[str, float]) -> None:
    inside = ("norms+residuals", "rope", "silu*up", "attention+kv", "embedding")
    graph = m["forward"] - m["products"]
    print(
        f"{name} batch {batch} (attention width {int(m['width'])}): step {m['step']:.2f} ms"
        f" = products {m['products']:.2f} + overhead {m['step'] - m['products']:.2f}"
        f" ({100 * (m['step'] - m['products']) / m['step']:.0f}%)"
    )
    print(f"  forward {m['forward']:.2f} ms: products {m['products']:.2f} + in-graph {graph:.2f}")
    for key in inside:
        print(f"    {key:<16} {m[key]:7.2f} ms (isolated)")
    print(f"    {'rest (dispatch)':<16} {graph - sum(m[k] for k in inside):7.2f} ms")
    engine = m["step"] - m["forward"]
    print(f"  step - forward {engine:.2f} ms (engine: sampling, readback, Python)")
    print(f"    {'argmax':<16} {m['argmax']:7.2f} ms (isolated)")
    print(f"    {'host cpu':<16} {m['host cpu']:7.2f} ms (main thread, overlaps the forward)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=["qwen2.5-0.5b-random"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="engine steps timed per round")
    ap.add_argument("--context", type=int, default=48, help="prompt tokens (sets the width)")
    ap.add_argument("--dtype", default=None, help="float32 (default), q8 or q4")
    args = ap.parse_args()
    print(f"BLAS: {blas_info()}")
    for name, folder in model_set(args.models).items():
        engine = Engine.load(folder, dtype=args.dtype)
        gc.collect()
        steps = args.steps or (16 if engine.model.num_layers > 8 else 300)
        for batch in args.batches:
            report(name, batch, profile(engine, batch, steps, args.rounds, args.context))


if __name__ == "__main__":
    main()
