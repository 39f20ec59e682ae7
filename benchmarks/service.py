"""What serving costs: in-process vs served decode, TTFT overhead, worker CPU per frame.

    python benchmarks/service.py [--model FOLDER] [--tokens 256] [--rounds 15] [--requests 50]

One run prints three figures against their targets:

1. **Decode tok/s, served / in-process** (target >= 0.97). In-process:
   `Engine.load(folder).generate_stream(...)` in this process. Served: a real
   `ffai-worker serve` subprocess on a private ipc socket, streamed with
   `AsyncClient`. Same prompt, greedy, exactly `--tokens` tokens (no EOS).
   Both are timed by their consumer from the first chunk to the final one
   (tokens after the first chunk / that time); the engine's own
   `decode_tokens_per_second` (final stats) is printed alongside. The phases
   run one after the other, alternating A B A B (the machine may have few
   cores); the figure is the median of the per-pair ratios, which cancels
   slow drift (the ratio of the medians is printed too).
2. **TTFT - prefill** (target p50 <= 2 ms): over `--requests` short served
   requests sent one at a time, the client-observed time from sending
   `generate` to the first chunk minus the worker's `prefill_time_s` from the
   final stats; also minus `queue_time_s + prefill_time_s`. p50 and p90. The
   same figures for in-process `generate_stream` (interleaved) are printed as
   a reference for what the engine itself adds (tokenizing, queueing).
3. **Worker CPU per streamed frame** (target <= 30 us): the worker's `info`
   counters `service_cpu_s` (CPU time of its actor thread outside
   `engine.step()`: receiving, decoding, handling, encoding, sending) and
   `frames_sent`, read before and after each served decode run. A cruder
   second figure divides the whole worker process's CPU time (utime + stime
   from /proc/<pid>/stat, model compute and ZeroMQ's I/O thread included) by
   the same frames.

Timings on a shared machine are noisy: the run reports how much CPU other
processes used meanwhile (from /proc/stat), and flags the run when it is high.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import TINYSTORIES

import ffai_worker  # noqa: F401 - swap in the fast BLAS before mlx loads
from ffai_client import AsyncClient
from ffai_client.types import GenerationChunk, GenerationParameters
from ffai_worker.engine import Engine
from ffai_worker.native.blas import blas_info

PROMPT = "Once upon a time there was a little girl named Lily. She loved to play outside"
TTFT_PROMPT = "Once upon a time"
RATIO_TARGET = 0.97
TTFT_TARGET_MS = 2.0
CPU_TARGET_US = 30.0
NOISY = 0.10  # other processes' CPU (cores) above which a run is flagged


@dataclass
class Run:
    wall_tps: float  # consumer-timed: tokens after the first chunk / (final chunk - first chunk)
    stats_tps: float  # the engine's decode_tokens_per_second
    tokens: int
    chunks: int


def summarize(times: list[float], chunks: list[GenerationChunk]) -> Run:
    final = chunks[-1]
    assert final.is_final and final.stats is not None, final
    tokens = sum(len(c.tokens) for c in chunks)
    after_first = tokens - len(chunks[0].tokens)
    span = times[-1] - times[0]
    return Run(
        wall_tps=after_first / span if span > 0 else 0.0,
        stats_tps=final.stats.decode_tokens_per_second,
        tokens=tokens,
        chunks=len(chunks),
    )


def in_process(engine: Engine, params: GenerationParameters) -> Run:
    times: list[float] = []
    chunks: list[GenerationChunk] = []
    for chunk in engine.generate_stream(PROMPT, parameters=params):
        times.append(time.perf_counter())
        chunks.append(chunk)
    return summarize(times, chunks)


async def served(client: AsyncClient, params: GenerationParameters) -> Run:
    times: list[float] = []
    chunks: list[GenerationChunk] = []
    async for chunk in client.generate_stream(PROMPT, parameters=params):
        times.append(time.perf_counter())
        chunks.append(chunk)
    return summarize(times, chunks)


# A TTFT sample: (time to the first chunk, the engine's queue_time_s, its prefill_time_s).
Sample = tuple[float, float, float]


def ttft_in_process(engine: Engine, params: GenerationParameters) -> Sample:
    first: float | None = None
    final: GenerationChunk | None = None
    t0 = time.perf_counter()
    for chunk in engine.generate_stream(TTFT_PROMPT, parameters=params):
        if first is None:
            first = time.perf_counter()
        final = chunk
    assert first is not None and final is not None and final.stats is not None
    return first - t0, final.stats.queue_time_s, final.stats.prefill_time_s


async def ttft_served(client: AsyncClient, params: GenerationParameters) -> Sample:
    first: float | None = None
    final: GenerationChunk | None = None
    t0 = time.perf_counter()
    async with client.generate_stream(TTFT_PROMPT, parameters=params) as stream:  # sends now
        async for chunk in stream:
            if first is None:
                first = time.perf_counter()
            final = chunk
    assert first is not None and final is not None and final.stats is not None
    return first - t0, final.stats.queue_time_s, final.stats.prefill_time_s


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """CPU (in cores) used by processes other than `pids` between start and stop."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.t0 = time.perf_counter()
        self.machine0 = machine_cpu_s()
        self.ours0 = sum(proc_cpu_s(pid) for pid in pids)

    def others(self) -> float:
        ours = sum(proc_cpu_s(pid) for pid in self.pids) - self.ours0
        busy = machine_cpu_s() - self.machine0
        return max(0.0, (busy - ours) / (time.perf_counter() - self.t0))


class Worker:
    """A `ffai-worker serve` subprocess on a private ipc endpoint."""

    def __init__(self, folder: Path) -> None:
        self.dir = tempfile.mkdtemp(prefix="ffai-bench-")
        self.endpoint = f"ipc://{self.dir}/w.sock"
        self.log_path = Path(self.dir) / "worker.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ffai_worker.cli", "serve", "--model", str(folder),
             "--endpoint", self.endpoint],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while b"serving on" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), linear between closest ranks."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load_note(others: float) -> str:
    note = f"other processes used {others:.2f} cores meanwhile"
    return note + (" - NOISY, rerun on a quieter machine" if others > NOISY else "")


@dataclass
class Results:
    local: list[Run]
    remote: list[Run]
    decode_others: float
    service_cpu_s: float
    frames: int
    process_cpu_s: float
    ttft_local: list[Sample]
    ttft_remote: list[Sample]
    ttft_others: float


async def measure(args: argparse.Namespace, engine: Engine, worker: Worker) -> Results:
    params = GenerationParameters(temperature=0.0, max_tokens=args.tokens, stop_on_eos=False)
    short = GenerationParameters(temperature=0.0, max_tokens=args.ttft_tokens, stop_on_eos=False)
    async with AsyncClient(worker.endpoint, timeout=60) as client:
        await client.ping()
        # Warm up both paths (first-call compilation, allocator growth, caches).
        warm = GenerationParameters(temperature=0.0, max_tokens=32, stop_on_eos=False)
        for _ in range(2):
            in_process(engine, warm)
            await served(client, warm)
            ttft_in_process(engine, short)
            await ttft_served(client, short)

        # 1 + 3: decode, alternating; the served runs also carry the CPU counters.
        meter = LoadMeter(os.getpid(), worker.proc.pid)
        local: list[Run] = []
        remote: list[Run] = []
        service_cpu = process_cpu = 0.0
        frames = 0
        for _ in range(args.rounds):
            local.append(in_process(engine, params))
            before = await client.info()
            cpu0 = proc_cpu_s(worker.proc.pid)
            remote.append(await served(client, params))
            cpu1 = proc_cpu_s(worker.proc.pid)
            after = await client.info()
            if before.service_cpu_s is None or after.service_cpu_s is None:
                raise RuntimeError("this worker does not report service counters in info")
            assert before.frames_sent is not None and after.frames_sent is not None
            service_cpu += after.service_cpu_s - before.service_cpu_s
            frames += after.frames_sent - before.frames_sent
            process_cpu += cpu1 - cpu0
        decode_others = meter.others()

        # 2: TTFT of short requests, one at a time, interleaved with in-process ones.
        meter = LoadMeter(os.getpid(), worker.proc.pid)
        ttft_local: list[Sample] = []
        ttft_remote: list[Sample] = []
        for _ in range(args.requests):
            ttft_local.append(ttft_in_process(engine, short))
            ttft_remote.append(await ttft_served(client, short))
        ttft_others = meter.others()
    return Results(
        local, remote, decode_others, service_cpu, frames, process_cpu,
        ttft_local, ttft_remote, ttft_others,
    )  # fmt: skip


def report(args: argparse.Namespace, engine: Engine, r: Results) -> None:
    def med(runs: list[Run], attr: str) -> float:
        return statistics.median(getattr(run, attr) for run in runs)

    pairs = list(zip(r.local, r.remote, strict=True))
    ratio = statistics.median(b.wall_tps / a.wall_tps for a, b in pairs)
    print(
        f"\ndecode: {args.tokens} tokens after a {len(engine.tokenize(PROMPT))}-token prompt,"
        f" greedy, {args.rounds} rounds alternating in-process / served (medians)"
    )
    print(f"  {'':<34}{'in-process':>12}{'served':>12}{'ratio':>8}")
    for label, attr in (
        ("consumer-timed tok/s", "wall_tps"),
        ("engine stats decode tok/s", "stats_tps"),
    ):
        a, b = med(r.local, attr), med(r.remote, attr)
        print(f"  {label:<34}{a:>12.1f}{b:>12.1f}{b / a:>8.3f}")
    q1, _, q3 = statistics.quantiles([b.wall_tps / a.wall_tps for a, b in pairs], n=4)
    print(f"  {'median of per-pair ratios (consumer-timed)':<58}{ratio:>8.3f}")
    print(f"  {'  their interquartile range (noise)':<50}{q1:>8.3f}{q3:>8.3f}")
    print("  per pair, consumer-timed tok/s (in-process/served):")
    print("    " + "  ".join(f"{a.wall_tps:.0f}/{b.wall_tps:.0f}" for a, b in pairs))
    print(f"  chunks per served run: {sorted({run.chunks for run in r.remote})}")
    print(f"  {load_note(r.decode_others)}")

    def rows(samples: list[Sample]) -> dict[str, list[float]]:
        return {
            "TTFT": [s[0] * 1e3 for s in samples],
            "engine prefill_time_s": [s[2] * 1e3 for s in samples],
            "engine queue_time_s": [s[1] * 1e3 for s in samples],
            "TTFT - prefill": [(s[0] - s[2]) * 1e3 for s in samples],
            "TTFT - (queue + prefill)": [(s[0] - s[1] - s[2]) * 1e3 for s in samples],
        }

    served_rows, local_rows = rows(r.ttft_remote), rows(r.ttft_local)
    print(
        f"\nTTFT: {args.requests} requests of {args.ttft_tokens} tokens,"
        f" {len(engine.tokenize(TTFT_PROMPT))}-token prompt, one at a time (ms)"
    )
    print(f"  {'':<28}{'served p50':>11}{'p90':>8}{'in-process p50':>16}{'p90':>8}")
    for label, values in served_rows.items():
        ref = local_rows[label]
        print(
            f"  {label:<28}{pct(values, 0.5):>11.3f}{pct(values, 0.9):>8.3f}"
            f"{pct(ref, 0.5):>16.3f}{pct(ref, 0.9):>8.3f}"
        )
    print(f"  {load_note(r.ttft_others)}")

    per_frame_us = r.service_cpu_s / r.frames * 1e6 if r.frames else float("nan")
    process_us = r.process_cpu_s / r.frames * 1e6 if r.frames else float("nan")
    print(
        f"\nworker CPU: {r.frames} frames sent during {args.rounds} served decode runs;"
        f" service thread {r.service_cpu_s * 1e3:.1f} ms,"
        f" whole process {r.process_cpu_s * 1e3:.0f} ms"
    )

    p50 = pct(served_rows["TTFT - prefill"], 0.5)
    p50q = pct(served_rows["TTFT - (queue + prefill)"], 0.5)
    table = [
        ("served / in-process decode tok/s", f"{ratio:.3f}", f">= {RATIO_TARGET}",
         verdict(ratio >= RATIO_TARGET)),
        ("TTFT - prefill, p50", f"{p50:.3f} ms", f"<= {TTFT_TARGET_MS:g} ms",
         verdict(p50 <= TTFT_TARGET_MS)),
        ("TTFT - (queue + prefill), p50", f"{p50q:.3f} ms", f"<= {TTFT_TARGET_MS:g} ms",
         verdict(p50q <= TTFT_TARGET_MS)),
        ("worker service CPU per frame", f"{per_frame_us:.1f} us", f"<= {CPU_TARGET_US:g} us",
         verdict(per_frame_us <= CPU_TARGET_US)),
        ("worker process CPU per frame (crude)", f"{process_us:.0f} us",
         "info only: model incl.", "-"),
    ]  # fmt: skip
    print(f"\n{'figure':<38}{'value':>12}  {'target':<24}result")
    for name, value, target, result in table:
        print(f"{name:<38}{value:>12}  {target:<24}{result}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(TINYSTORIES), help="model folder (default: tinystories)")
    ap.add_argument("--tokens", type=int, default=256, help="decode tokens per run")
    ap.add_argument("--rounds", type=int, default=15, help="in-process/served pairs")
    ap.add_argument("--requests", type=int, default=50, help="TTFT requests")
    ap.add_argument("--ttft-tokens", type=int, default=4, help="max_tokens of a TTFT request")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(args.model)
    print(f"model: {folder}")
    print(f"BLAS:  {blas_info()}")
    engine = Engine.load(folder)
    worker = Worker(folder)
    try:
        results = asyncio.run(measure(args, engine, worker))
    finally:
        worker.stop()
    report(args, engine, results)


if __name__ == "__main__":
    main()
