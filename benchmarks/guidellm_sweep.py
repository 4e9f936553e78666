"""guidellm, vLLM's load tool, against `trainonce serve`: concurrent streams at 32, 64, 128 and 256, and its sweep.

    .venv/bin/python benchmarks/guidellm_sweep.py --workdir runs/pipeline
    .venv/bin/python benchmarks/guidellm_sweep.py --workdir runs/pipeline --checkout /path/to/older/checkout

Starts `trainonce serve` on the workdir's `trainonce-chat@champion` (from `--checkout`, default this one: a second
checkout at an older commit measures "before"), then runs guidellm 0.8.1 (`--guidellm`: its executable, in an
environment of its own, since it upgrades packages the server's stack uses; created on first use), with
synthetic prompts of `--prompt-tokens` and replies of `--output-tokens` (the tokenizer from `trainonce export-hf`):
1. `--profile kind=concurrent` at each of `--streams`, `--seconds` each: per step the successful and errored
   requests, output tokens/s, and time to first token and request latency p50 / p99 (guidellm's own figures);
2. with `--sweep`, guidellm's default sweep (synchronous, throughput, then constant rates between them), the
   requests and errors of every step.
guidellm's JSON reports are kept in the printed folder. Nothing is asserted: it is a benchmark; run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_load import start_server  # this folder (benchmarks/), as the script runs

GUIDELLM = "guidellm==0.8.1"
ROOT = Path(__file__).resolve().parents[1]
VENV = Path.home() / ".cache" / "trainonce" / "venvs" / "guidellm-0.8.1"  # where the slow tests' tool venvs live


def guidellm_executable(given: str | None) -> Path:
    if given:
        return Path(given)
    if not (VENV / "bin" / "guidellm").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", GUIDELLM], check=True)
    return VENV / "bin" / "guidellm"


def guidellm(
    executable: Path, url: str, tokenizer: Path, profile: list[str], data: str, seconds: int, report: Path
) -> None:
    command = [
        str(executable), "run",
        "--backend", f"kind=openai_http,target={url},model=trainonce-chat",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--data", data,
        *profile,
        "--constraint", f"kind=max_duration,seconds={seconds}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=report.parent)


def steps(report: Path) -> list[dict]:
    """Each benchmark (step) of a guidellm JSON report, as one row of figures."""
    rows = []
    for benchmark in json.loads(report.read_text())["benchmarks"]:
        metrics, strategy = benchmark["metrics"], benchmark["config"]["strategy"]
        rows.append(
            {
                "strategy": strategy["type_"],
                "streams": strategy.get("streams"),
                "rate": strategy.get("rate"),
                "successful": metrics["request_totals"]["successful"],
                "errored": metrics["request_totals"]["errored"],
                "output_tok_s": metrics["output_tokens_per_second"]["successful"]["mean"],
                "ttft_p50": metrics["time_to_first_token_ms"]["successful"]["percentiles"]["p50"],
                "ttft_p99": metrics["time_to_first_token_ms"]["successful"]["percentiles"]["p99"],
                "latency_p50": metrics["request_latency"]["successful"]["percentiles"]["p50"],
                "latency_p99": metrics["request_latency"]["successful"]["percentiles"]["p99"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a pipeline workdir whose champion to serve")
    parser.add_argument("--checkout", default=str(ROOT), help="the trainonce checkout whose server to run")
    parser.add_argument("--threads", type=int, default=2, help="the server's onnxruntime threads")
    parser.add_argument("--streams", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--seconds", type=int, default=30, help="per step")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--sweep", action="store_true", help="also guidellm's default sweep")
    parser.add_argument("--guidellm", help=f"the guidellm executable (default: {GUIDELLM} in {VENV})")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="guidellm-"))
    workdir = Path(args.workdir).resolve()
    tokenizer = folder / "hf"
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "export-hf", "--workdir", str(workdir), "--out", str(tokenizer)],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    executable = guidellm_executable(args.guidellm)
    data = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}"
    process, url = start_server(str(workdir), "--threads", str(args.threads), checkout=Path(args.checkout).resolve())
    try:
        concurrent = folder / "concurrent.json"
        streams = ",".join(map(str, args.streams))
        profile = ["--profile", "kind=concurrent", "--override", "profile.streams", streams]
        guidellm(executable, url, tokenizer, profile, data, args.seconds, concurrent)
        print(f"{GUIDELLM}, {args.prompt_tokens}-token prompts, {args.output_tokens}-token replies, ", end="")
        print(f"{args.seconds} s per step; server from {args.checkout}")
        header = f"{'streams':>8}{'ok':>7}{'errors':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p99':>8}"
        print(f"{header}{'latency p50':>13}{'p99':>8}")
        for row in steps(concurrent):
            print(
                f"{row['streams']:>8}{row['successful']:>7}{row['errored']:>8}{row['output_tok_s']:>11,.0f}"
                f"{row['ttft_p50']:>8.0f}ms{row['ttft_p99']:>6.0f}ms{row['latency_p50']:>12.2f}s"
                f"{row['latency_p99']:>7.2f}s",
                flush=True,
            )
        if args.sweep:
            sweep = folder / "sweep.json"
            guidellm(executable, url, tokenizer, ["--profile", "kind=sweep"], data, args.seconds, sweep)
            print(f"\nsweep: {'step':<12}{'rate':>8}{'ok':>7}{'errors':>8}{'out tok/s':>11}")
            for row in steps(sweep):
                rate = f"{row['rate']:.1f}" if isinstance(row["rate"], float) else ""
                print(
                    f"       {row['strategy']:<12}{rate:>8}{row['successful']:>7}{row['errored']:>8}"
                    f"{row['output_tok_s']:>11,.0f}"
                )
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"\nreports in {folder}")


if __name__ == "__main__":
    main()
