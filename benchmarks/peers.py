"""Helpers for benchmarks/cpu_peers.py: GGUF conversion, a llama.cpp driver, memory bandwidth.

llama.cpp runs through llama-cpp-python's low-level ctypes API (the `bench` extra), so a
batched decode is one `llama_decode` over a `llama_batch` holding one token per sequence.
"""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

GGUF_TYPES = {"f32": "f32", "q8": "q8_0", "q4": "q4_0"}  # our precision -> llama.cpp's


# -- converting checkpoints to GGUF -------------------------------------------------
def llama_cpp_source(cache: Path) -> Path:
    """The llama.cpp tree inside the installed llama-cpp-python's sdist (fetched once)."""
    import llama_cpp

    version = llama_cpp.__version__
    root = cache / f"llama_cpp_python-{version}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    subprocess.run([*cmd, "-d", str(cache), f"llama-cpp-python=={version}"], check=True)
    with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as tar:
        tar.extractall(cache, filter="data")
    return tree


def gguf_file(folder: Path, name: str, precision: str, cache: Path) -> Path:
    """`name` converted to GGUF at `precision` (f32, q8 = Q8_0, q4 = Q4_0), cached."""
    out = cache / "gguf" / f"{name}-{GGUF_TYPES[precision]}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if precision == "q4":  # the converter writes f32/f16/q8_0 only; Q4_0 is llama.cpp's quantizer
        _quantize(gguf_file(folder, name, "f32", cache), tmp)
    else:
        script = llama_cpp_source(cache) / "convert_hf_to_gguf.py"
        cmd = [sys.executable, str(script), str(folder), "--outtype", GGUF_TYPES[precision]]
        subprocess.run(
            [*cmd, "--outfile", str(tmp)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    tmp.rename(out)
    return out


def _llama_cpp() -> Any:
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # errors only: its loader and quantizer logs would drown the table
    return llama_cpp


def _quantize(src: Path, dst: Path) -> None:
    L = _llama_cpp()
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


# -- llama.cpp ------------------------------------------------------------------------
class LlamaCpp:
    """One GGUF model and one context with `n_seq` sequences, driven token by token."""

    _backend = False

    def __init__(self, path: Path, n_ctx: int, n_seq: int, threads: int, n_batch: int = 512):
        self.L = L = _llama_cpp()
        if not LlamaCpp._backend:
            L.llama_backend_init()
            LlamaCpp._backend = True
        self.model = L.llama_model_load_from_file(
            str(path).encode(), L.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True  # every sequence may use the whole context
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_batch = n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_batch, 0, n_seq)
        self.size_bytes = int(L.llama_model_size(self.model))

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _feed(self, ids: list[int], seq: int, start: int = 0, all_logits: bool = False) -> list:
        """Prefill `ids` into `seq` in n_batch chunks; return the logits rows asked for."""
        rows = []
        for at in range(0, len(ids), self.n_batch):
            part = ids[at : at + self.n_batch]
            last = at + len(part) == len(ids)
            wants = [all_logits or (last and j == len(part) - 1) for j in range(len(part))]
            self._decode(
                [
                    (t, start + at + j, seq, w)
                    for j, (t, w) in enumerate(zip(part, wants, strict=True))
                ]
            )
            rows += [self._logits(j).copy() for j, w in enumerate(wants) if w]
        return rows

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def prefill_tps(self, ids: list[int]) -> float:
        self.clear()
        t0 = time.perf_counter()
        self._feed(ids, 0)
        return len(ids) / (time.perf_counter() - t0)

    def generate(self, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
        """Greedy `tokens` per prompt, all sequences in one batch per step.

        Returns the tokens and the aggregate decode tok/s (after each prompt's first token).
        """
        self.clear()
        out = [[int(np.argmax(self._feed(p, s)[0]))] for s, p in enumerate(prompts)]
        pos = [len(p) for p in prompts]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            self._decode([(o[-1], pos[s], s, True) for s, o in enumerate(out)])
            for s, o in enumerate(out):
                o.append(int(np.argmax(self._logits(s))))
                pos[s] += 1
        elapsed = time.perf_counter() - t0
        return out, len(prompts) * (tokens - 1) / elapsed

    def logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 (float64 log-softmax of llama.cpp's logits)."""
        self.clear()
        rows = self._feed(ids, 0, all_logits=True)
        out = []
        for row, tok in zip(rows[:-1], ids[1:], strict=True):
            z = row.astype(np.float64)
            out.append(float(z[tok] - z.max() - math.log(np.exp(z - z.max()).sum())))
        return out


# -- memory bandwidth -----------------------------------------------------------------
def _threaded(fn, arrays: list[np.ndarray]) -> float:
    """Seconds for `fn` over each array, one thread per array, all at once."""
    threads = [threading.Thread(target=fn, args=(a,)) for a in arrays]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def read_bandwidth(threads: int = 2, mib_each: int = 1024, rounds: int = 5) -> dict[str, float]:
    """Streaming-read GB/s of `threads` threads over their own buffers (GIL released).

    Two independent loops: numpy's int64 sum (a plain SIMD add: numpy's float sum is
    pairwise and, measured here, compute-bound at ~60% of this) and BLAS sdot of a buffer
    with itself (one read stream). The best round of each: the machine is shared.
    """
    arrays = [np.ones(mib_each * 2**18, dtype=np.float32) for _ in range(threads)]
    total = sum(a.nbytes for a in arrays)
    methods = {"numpy int64 sum": lambda a: a.view(np.int64).sum(), "blas sdot": lambda a: a @ a}
    result = {}
    for name, fn in methods.items():
        fn(arrays[0][:1024])
        best = min(_threaded(fn, arrays) for _ in range(rounds))
        result[name] = total / best / 1e9
    del arrays
    return result
