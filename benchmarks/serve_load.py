"""Load on the OpenAI-compatible server: N concurrent clients send a fixed number of chat requests.

    .venv/bin/python benchmarks/serve_load.py --workdir runs/pipeline --clients 8 --requests 200

Starts `trainonce serve` on the workdir's `trainonce-chat@champion` (or uses --url), then prints requests/s,
p50/p99 latency, generated tokens/s and the error count (which must be 0).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from flows.readiness import http_ok, wait_until_ready

PROMPTS = [
    "Repeat: king queen crown",
    "Reverse: one two three",
    "Sort: pear apple fig",
    "What is 12 + 30?",
    "Copy: to be or not to be",
]


def start_server(workdir: str, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--workdir",
            workdir,
            "--port",
            str(port),
            "--threads",
            str(threads),
        ],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(http_ok(f"{url}/health"), f"the server at {url}", process)
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/pipeline")
    parser.add_argument("--url", help="an already running server (default: start one on --workdir)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per request")
    args = parser.parse_args()
    process, url = (None, args.url) if args.url else start_server(args.workdir, args.threads)
    try:
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key=os.environ.get("TRAINONCE_API_KEY", "none"), max_retries=0, timeout=120
        )

        def one(i: int) -> tuple[float, int, str | None]:
            start = time.perf_counter()
            try:
                reply = client.chat.completions.create(
                    model="trainonce-chat",
                    messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=args.max_tokens,
                )
                return time.perf_counter() - start, reply.usage.completion_tokens, None
            except openai.OpenAIError as error:
                return time.perf_counter() - start, 0, repr(error)

        one(0)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    latencies = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"{args.requests} requests, {args.clients} concurrent clients, max_tokens {args.max_tokens}, "
        f"{args.threads} onnxruntime thread(s) per request"
    )
    print(
        f"requests/s {args.requests / wall:.1f}   p50 {statistics.median(latencies) * 1000:.0f} ms   "
        f"p99 {p99 * 1000:.0f} ms   generated tokens/s {sum(r[1] for r in results) / wall:.0f}   "
        f"errors {len(errors)}"
    )
    if errors:
        print("first error:", errors[0])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
