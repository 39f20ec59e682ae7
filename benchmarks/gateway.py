"""What the HTTP gateway costs: streamed tok/s through it vs AsyncClient, TTFT added, CPU per event.

    python benchmarks/gateway.py [--model FOLDER | --qwen05b] [--tokens 200] [--rounds 5]
                                 [--requests 40]

A real `ffai-worker serve` and a real `ffai-gateway` run as subprocesses.

1. **tok/s through the gateway / through AsyncClient** (target >= 0.95), for 1
   and 8 concurrent streams: the same greedy completion of exactly `--tokens`
   tokens (ignore_eos), A = `AsyncClient.generate_stream` straight to the
   worker, B = the official `openai` client streaming `/v1/completions`.
   tok/s = all tokens / wall time from the first request sent to the last
   stream ended. Rounds alternate A B A B; the figure is the median of the
   per-pair ratios.
2. **TTFT added by the gateway, p50** (target <= 5 ms): `--requests` short
   requests one at a time, interleaved; time from sending to the first text,
   through a raw HTTP stream (httpx) minus straight through AsyncClient.
3. **Gateway CPU per streamed event**: the gateway process's utime + stime over
   the 8-stream HTTP runs, divided by the SSE events its clients received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import openai
from models import TINYSTORIES, qwen05b_random
from service import LoadMeter, Worker, pct, proc_cpu_s

from ffai_client import AsyncClient
from ffai_client.types import GenerationParameters

PROMPT = "Once upon a time there was a little girl named Lily. She loved to play outside"
RATIO_TARGET = 0.95
TTFT_TARGET_MS = 5.0


class Gateway:
    def __init__(self, endpoint: str, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        log = Path(tempfile.mkdtemp(prefix="ffai-bench-gw-")) / "gateway.log"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ffai_client.gateway.cli", "--listen", f"127.0.0.1:{port}",
             "--worker", endpoint],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).json()["data"]:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


async def direct_streams(client: AsyncClient, n: int, tokens: int) -> float:
    params = GenerationParameters(max_tokens=tokens, temperature=0.0, stop_on_eos=False)

    async def one() -> int:
        count = 0
        async for chunk in client.generate_stream(PROMPT, parameters=params):
            count += len(chunk.tokens)
        return count

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(n)))
    assert all(c == tokens for c in counts), counts
    return n * tokens / (time.perf_counter() - t0)


async def http_streams(
    oai: openai.AsyncOpenAI, model: str, n: int, tokens: int
) -> tuple[float, int]:
    async def one() -> tuple[int, int]:
        stream = await oai.completions.create(
            model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        events = generated = 0
        async for chunk in stream:
            events += 1
            if chunk.usage is not None:
                generated = chunk.usage.completion_tokens
        return generated, events

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - t0
    assert all(g == tokens for g, _ in results), results
    return n * tokens / elapsed, sum(e for _, e in results)


async def ttft_direct(client: AsyncClient) -> float:
    params = GenerationParameters(max_tokens=2, temperature=0.0, stop_on_eos=False)
    t0 = time.perf_counter()
    async with client.generate_stream("Once upon a time", parameters=params) as stream:
        async for chunk in stream:
            if chunk.text:
                first = time.perf_counter() - t0
                break
    return first


async def ttft_http(http: httpx.AsyncClient, model: str) -> float:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    t0 = time.perf_counter()
    first = 0.0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = first or time.perf_counter() - t0
    return first


async def measure(args: argparse.Namespace, worker: Worker, gateway: Gateway) -> None:
    async with AsyncClient(worker.endpoint) as client:
        model = httpx.get(gateway.url + "/v1/models").json()["data"][0]["id"]
        oai = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
        await direct_streams(client, 1, 8)  # warm both paths
        await http_streams(oai, model, 1, 8)
        for n in (1, 8):
            ratios, a_all, b_all = [], [], []
            cpu = events = 0.0
            for _ in range(args.rounds):
                a = await direct_streams(client, n, args.tokens)
                cpu0 = proc_cpu_s(gateway.proc.pid)
                b, ev = await http_streams(oai, model, n, args.tokens)
                cpu += proc_cpu_s(gateway.proc.pid) - cpu0
                events += ev
                ratios.append(b / a)
                a_all.append(a)
                b_all.append(b)
            ratio = statistics.median(ratios)
            mark = "ok" if ratio >= RATIO_TARGET else "MISSED"
            print(f"{n} stream(s): AsyncClient {statistics.median(a_all):8.1f} tok/s, "
                  f"gateway {statistics.median(b_all):8.1f} tok/s, ratio {ratio:.3f} "
                  f"(target >= {RATIO_TARGET}: {mark})")  # fmt: skip
            if n == 8:
                print(f"gateway CPU per streamed event: {cpu / events * 1e6:.0f} us "
                      f"({events:.0f} events, {cpu:.2f} s CPU)")  # fmt: skip
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            direct, via = [], []
            for _ in range(args.requests):
                direct.append(await ttft_direct(client))
                via.append(await ttft_http(http, model))
        added = (pct(via, 0.5) - pct(direct, 0.5)) * 1000
        mark = "ok" if added <= TTFT_TARGET_MS else "MISSED"
        print(f"TTFT p50: AsyncClient {pct(direct, 0.5) * 1000:.2f} ms, gateway "
              f"{pct(via, 0.5) * 1000:.2f} ms, added {added:.2f} ms "
              f"(target <= {TTFT_TARGET_MS} ms: {mark}); p90 added "
              f"{(pct(via, 0.9) - pct(direct, 0.9)) * 1000:.2f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default tinystories)")
    ap.add_argument("--qwen05b", action="store_true", help="a random Qwen2.5-0.5B-shaped model")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--port", type=int, default=18461)
    args = ap.parse_args()
    folder = qwen05b_random() if args.qwen05b else (args.model or TINYSTORIES)
    print(f"model: {folder}")
    worker = Worker(folder)
    gateway = Gateway(worker.endpoint, args.port)
    meter = LoadMeter(worker.proc.pid, gateway.proc.pid)
    try:
        asyncio.run(measure(args, worker, gateway))
    finally:
        others = meter.others()
        gateway.stop()
        worker.stop()
    print(f"other processes used {others:.2f} cores meanwhile")


if __name__ == "__main__":
    main()
