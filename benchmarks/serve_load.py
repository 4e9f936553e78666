"""Load on the OpenAI-compatible server, batched decoding against each request decoding alone, side by side.

    .venv/bin/python benchmarks/serve_load.py --workdir runs/pipeline --clients 1 8 32 --requests 64

For each setting of `--max-batch` (default: 1, each request decodes alone, one at a time; and 32), starts
`trainonce serve` on the workdir's `trainonce-chat@champion` with `--threads` onnxruntime threads (default 2:
both cores), then for each number of concurrent clients sends `--requests` streamed chat requests with
fixed-length replies (`ignore_eos`, `max_tokens`), so that every setting generates the same number of tokens.
Prints aggregate completion tokens/s, time to first token and request latency (p50/p99), and the error count
(which must be 0); then the same decoding without HTTP, in-process, alone vs batched (the engine's share).
The model must have been exported with batched decoding (a `seqlens_k` or `pad_lengths` graph input); the server
logs a warning and decodes one sequence at a time otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai

from flows.readiness import free_port, http_ok, wait_until_ready
from models.chat_format import Message
from registry.models import download_chat_package
from serving.batching import Batching, DecodeBatcher
from serving.engine import EVERY_TOKEN, ChatPackage

PROMPTS = [
    "Repeat: king queen crown",
    "Reverse: one two three",
    "Sort: pear apple fig",
    "What is 12 + 30?",
    "Copy: to be or not to be",
]


def started(
    command: list[str], url: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """`command` (a server listening at `url`) started from `cwd` (default: the repository root), once its /health
    answers."""
    process = subprocess.Popen(
        command,
        cwd=cwd or Path(__file__).resolve().parents[1],
        env={**(os.environ if env is None else env), "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_ready(http_ok(f"{url}/health"), f"the server at {url}", process)
    return process


def start_server(workdir: str, *options: str, checkout: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`trainonce serve` on the workdir's champion with `options`, from `checkout` (default: this one) -> the process
    and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "--workdir", workdir, "--port", str(port), *options]
    url = f"http://127.0.0.1:{port}"
    env = None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout)}
    return started(command, url, env, checkout), url


@dataclass(frozen=True)
class Outcome:
    seconds: float
    first_token: float
    tokens: int
    error: str | None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list[Outcome]]:
    """`requests` streamed requests from `clients` threads; wall seconds and each request's outcome."""
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key=os.environ.get("TRAINONCE_API_KEY", "none"), max_retries=0, timeout=600
    )

    def one(i: int) -> Outcome:
        start = time.perf_counter()
        first, tokens = float("nan"), 0
        try:
            stream = client.chat.completions.create(
                model="trainonce-chat",
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first != first:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return Outcome(time.perf_counter() - start, first, tokens, None)
        except openai.OpenAIError as error:
            return Outcome(time.perf_counter() - start, first, 0, repr(error))

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(requests)))
    return time.perf_counter() - start, outcomes


def engine_rows(workdir: str, threads: int, clients: list[int], max_tokens: int, max_batch: int) -> None:
    """The decoding engine without HTTP, in this process: `clients` sequences decoded one after another alone
    vs together in one batch; what batching gains before the HTTP layer takes its share of the cores."""
    package = ChatPackage(download_chat_package(workdir, "trainonce-chat@champion"), threads=threads)
    prompt = package.chat_prompt([Message(role="user", content=PROMPTS[0])])
    package.complete(prompt, max_tokens, EVERY_TOKEN)  # warm-up
    print(f"\nengine only (no HTTP), {max_tokens} tokens per sequence, {threads} onnxruntime thread(s)")
    print(f"{'sequences':>9} {'alone tok/s':>12} {'batched tok/s':>14} {'ratio':>6}")
    for count in clients:
        start = time.perf_counter()
        for _ in range(count):
            package.complete(prompt, max_tokens, EVERY_TOKEN)
        alone = count * max_tokens / (time.perf_counter() - start)
        batcher = DecodeBatcher(package, Batching(max_batch=max_batch, max_waiting=count))
        start = time.perf_counter()
        for stream in batcher.submit([package.decoder(prompt, max_tokens, EVERY_TOKEN) for _ in range(count)]):
            list(stream)
        batched = count * max_tokens / (time.perf_counter() - start)
        print(f"{count:>9} {alone:>12.0f} {batched:>14.0f} {batched / alone:>5.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/pipeline")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="per number of clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads of the server")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 32], help="1: each request decodes alone")
    args = parser.parse_args()
    print(
        f"{args.requests} streamed requests per row, {args.max_tokens} tokens each (ignore_eos), "
        f"{args.threads} onnxruntime thread(s), {os.cpu_count()} cores; workdir {args.workdir}"
    )
    header = ("max_batch", 9), ("clients", 7), ("tokens/s", 9), ("TTFT p50", 9), ("p50 (s)", 8), ("p99 (s)", 8)
    print(" ".join(f"{name:>{width}}" for name, width in header), "errors")
    failed = False
    for max_batch in args.max_batch:
        options = ["--threads", str(args.threads), "--max-batch", str(max_batch), "--max-waiting", "4096"]
        process, url = start_server(args.workdir, *options)
        try:
            for clients in args.clients:
                wall, outcomes = load(url, clients, args.requests, args.max_tokens)
                errors = [o.error for o in outcomes if o.error]
                latencies = [o.seconds for o in outcomes]
                first = [o.first_token for o in outcomes if o.first_token == o.first_token]
                print(
                    f"{max_batch:>9} {clients:>7} {sum(o.tokens for o in outcomes) / wall:>9.0f} "
                    f"{statistics.median(first) * 1000 if first else float('nan'):>7.0f}ms "
                    f"{statistics.median(latencies):>8.2f} {percentile(latencies, 0.99):>8.2f} {len(errors):>6}",
                    flush=True,
                )
                if errors:
                    print("  first error:", errors[0])
                    failed = True
        finally:
            process.terminate()
            process.wait(timeout=30)
    engine_rows(args.workdir, args.threads, args.clients, args.max_tokens, max(args.max_batch))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
