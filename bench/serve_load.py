"""Load test of ``finetune serve``: requests per second and p50/p99 latency at 1, 8 and 32
concurrent clients, with dynamic batching on (``--max-batch-size 32``) and off (``1``).

The server runs as its own process (``finetune serve RUN --port P``); the clients are asyncio
tasks of one httpx client in this process, each sending one real Fashion-MNIST test image (PNG,
multipart) per request, the next as soon as the answer is back. Both share the machine's cores,
as a server and its load generator on one box do. ``model calls`` is the server's own count
(``GET /health``): images per model call shows how much batching happened.

    python bench/serve_load.py --model /tmp/srv/run --data ../shared/data/fashion-mnist \\
        --requests 600 --out bench/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from finetune.data.sources import load_idx


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", model, "--port",
                             str(port), "--max-batch-size", str(max_batch), "--batch-wait-ms",
                             str(wait_ms)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


async def _client(http: httpx.AsyncClient, url: str, pngs: list[bytes], todo: list[int],
                  latencies: list[float]) -> None:
    while todo:
        i = todo.pop()
        start = time.perf_counter()
        r = await http.post(f"{url}/predict", files={"files": (f"{i}.png", pngs[i % len(pngs)])})
        r.raise_for_status()
        latencies.append(time.perf_counter() - start)


async def load(url: str, pngs: list[bytes], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    todo = list(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        calls = (await http.get(f"{url}/health")).json()["model_calls"]
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, url, pngs, todo, latencies)
                               for _ in range(clients)))
        seconds = time.perf_counter() - start
        calls = (await http.get(f"{url}/health")).json()["model_calls"] - calls
    latencies.sort()
    return {"clients": clients, "requests": requests, "rps": round(requests / seconds, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1,
                                                 int(0.99 * len(latencies)))], 1),
            "images_per_model_call": round(requests / calls, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a run folder")
    ap.add_argument("--data", required=True, help="Fashion-MNIST IDX folder (test images)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=600, help="per concurrency level")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    _, test = load_idx(Path(args.data))
    pngs = []
    for image in test.images[:256, 0].numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    results = []
    for max_batch in (32, 1):
        proc, url = start_server(args.model, max_batch, args.batch_wait_ms)
        try:
            asyncio.run(load(url, pngs, 1, 50))  # warm-up
            for clients in map(int, args.clients.split(",")):
                row = {"batching": max_batch > 1, "max_batch_size": max_batch,
                       **asyncio.run(load(url, pngs, clients, args.requests))}
                print(json.dumps(row), flush=True)
                results.append(row)
        finally:
            proc.terminate()
            proc.wait()
    if args.out:
        args.out.write_text(json.dumps({"machine": cpu_model(), "cores": os.cpu_count(),
                                        "date": time.strftime("%Y-%m-%d"),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
