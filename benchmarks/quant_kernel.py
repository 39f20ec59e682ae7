"""The native 4/8-bit matmul against float32, product by product, on the CPU.

    python benchmarks/quant_kernel.py [--rows 1 8 16] [--threads 1 2] [--isa avx2]

For the Qwen2.5-0.5B shapes (a 896x896 projection, the 4864x896 MLP, its 896x4864
transpose and the 151936x896 tied LM head) it prints, per row count M: the time of one
product through MLX (best of 7 rounds of 20 back-to-back products, so small weights sit
in cache as they do not in a real step), the bytes read per second, and float32 (MLX's
matmul: OpenBLAS with our small-M kernel in front) for comparison. Each quantized
product runs on MLX's row-major layout and on the packed layout (`quant.pack`) that the
model uses; `--layouts packed` leaves the first out.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

# isort: off
import ffai_worker  # noqa: F401 - swap in the fast BLAS before mlx loads

# isort: on
import mlx.core as mx

from ffai_worker.native import _quant, quant
from ffai_worker.native.blas import blas_info

SHAPES = [(896, 896), (4864, 896), (896, 4864), (151936, 896)]


def best_seconds(build: Callable[[], list[mx.array]], rounds: int = 7) -> float:
    mx.eval(build())
    best = float("inf")
    for _ in range(rounds):
        outs = build()
        start = time.perf_counter()
        mx.eval(outs)
        best = min(best, (time.perf_counter() - start) / len(outs))
    return best


def row(n: int, k: int, m: int, layouts: list[str]) -> str:
    w = mx.random.normal((n, k)) * 0.02
    reps = 2 if n > 100_000 else 20
    xs = [mx.random.normal((m, k)) for _ in range(reps)]
    mx.eval(w, xs)
    parts = []
    f32 = best_seconds(lambda: [x @ w.T for x in xs])
    parts.append(f"f32 {f32 * 1e3:8.3f} ms {w.nbytes / f32 / 1e9:5.1f} GB/s")
    for bits in (8, 4):
        q, s, b = mx.quantize(w, group_size=64, bits=bits)
        s, b = s.astype(mx.float16), b.astype(mx.float16)
        size = q.nbytes + s.nbytes + b.nbytes
        for layout in layouts:
            packed_n = n if layout == "packed" else 0
            q, s, b = (quant.pack(a) for a in (q, s, b)) if packed_n else (q, s, b)
            mx.eval(q, s, b)
            t = best_seconds(
                lambda q=q, s=s, b=b, bits=bits, p=packed_n: [
                    quant.quant_matmul(x, q, s, b, bits=bits, group_size=64, packed_n=p) for x in xs
                ]
            )
            name = f"q{bits}{'p' if packed_n else ''}"
            parts.append(f"{name} {t * 1e3:7.3f} ms {size / t / 1e9:5.1f} GB/s ({f32 / t:4.1f}x)")
    return f"{n:>6}x{k:<5} M={m:<3} " + " | ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", nargs="*", type=int, default=[1, 8, 16])
    ap.add_argument("--threads", nargs="*", type=int, default=[0], help="0: the default")
    ap.add_argument("--isa", default="", help="avx512-vnni, avx2 or generic (default: best)")
    ap.add_argument("--layouts", nargs="*", default=["rows", "packed"], choices=["rows", "packed"])
    args = ap.parse_args()
    print(f"BLAS: {blas_info()}")
    if not quant.available():
        raise SystemExit(quant.describe())
    for threads in args.threads:
        if _quant.configure(threads, args.isa) < 0:
            raise SystemExit(f"this CPU or build has no {args.isa}")
        print(quant.describe())
        for n, k in SHAPES:
            for m in args.rows:
                print(row(n, k, m, args.layouts), flush=True)


if __name__ == "__main__":
    main()
