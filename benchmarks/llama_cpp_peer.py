"""trainonce's onnxruntime path against llama.cpp, the engine a CPU user would otherwise pick: the same weights, the
same threads, side by side at each precision, in one run.

    .venv/bin/python benchmarks/llama_cpp_peer.py --workdir runs/pipeline          # the pipeline's champion
    .venv/bin/python benchmarks/llama_cpp_peer.py --shape                          # ~10 M parameters, random

The model is exported both ways: ONNX packages fp32 / INT8 / INT4 / INT2 (tasks/deploy/onnx_export.py, what
`trainonce serve` runs: the fused graph, and the traced graph as "before") and GGUF f32 / f16 / Q8_0 / Q4_0 /
Q4_K_M / Q2_K (tasks/deploy/gguf.py: llama.cpp's converter and quantizer). Printed:
0. file sizes, and onnxruntime kernels per decode step (its profiler) of the traced and the fused graph;
1. quality (a trained model only): validation perplexity of every file on the same windows the deploy stage
   measures (`EvaluationConfig`), and its change from the float reference of its own runtime;
2. engine decode speed, batch 1, no HTTP: greedy tokens/s with every token forced, ours
   (`ChatPackage.complete`) vs llama-cpp-python (`Llama.generate`, llama.cpp's sampler), `--threads` each;
3. server throughput: `trainonce serve` (batched decoding, `--max-batch 32`) vs `llama-server` (continuous
   batching, `-np` slots = the most clients), `--clients` concurrent streamed chat requests of `--max-tokens`
   forced tokens each (`ignore_eos`, which both servers take), aggregate completion tokens/s and TTFT p50.
`--parts` runs some of them (e.g. `--parts servers` after a serving change). Needs llama.cpp (`make llama-cpp`).
Nothing is asserted: it is a benchmark; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from serve_load import free_port, load, started  # this folder (benchmarks/), as the script runs

from flows.cpu_threads import SPIN_COUNT
from models.chat_format import ChatFormat, Message
from models.checkpoint import load_model, save_model
from models.config import MoEConfig
from models.moe import ElasticMoE
from registry.models import register_chat_package, version_tags
from registry.tracking import RunLogger
from serving import CHAT_PYFUNC_CODE
from serving.engine import EVERY_TOKEN, ChatPackage
from tasks.data.corpus import PreparedData, prepare_data, train_tokenizer
from tasks.deploy.config import DeployConfig, EvaluationConfig
from tasks.deploy.evaluate import validation_windows
from tasks.deploy.gguf import export_gguf
from tasks.deploy.llama_cpp import find_llama_cpp
from tasks.deploy.onnx_export import build_packages
from tasks.pipeline_config import load_pipeline_config

PAIRS = [
    ("fp32", "f32"),
    ("fp32", "f16"),
    ("int8", "q8_0"),
    ("int4", "q4_0"),
    ("int4", "q4_k_m"),
    ("int2", "q2_k"),
    ("traced-fp32", "f32"),  # before the fused graph
    ("traced-int4", "q4_0"),
]
OURS = DeployConfig(variants=("fp32", "int8", "int4", "int2"))
TRACED = DeployConfig(graph="traced", variants=("fp32", "int4"))
GGUF = tuple(dict.fromkeys(g for _, g in PAIRS))
PARTS = ["files", "perplexity", "engines", "servers"]
PROMPT = "Repeat: king queen crown"
LIBGOMP_DEFAULT_SPIN_COUNT = "300000"


def trained_model(workdir: str) -> ElasticMoE:
    """The champion's PyTorch parent (the weights its ONNX package was exported from)."""
    from registry.models import download_checkpoint, resolve_version

    champion = resolve_version(workdir, "trainonce-chat@champion")
    checkpoint = download_checkpoint(workdir, version_tags(workdir, champion)["parent_model"])
    return load_model(checkpoint.checkpoint_dir).eval()


def shaped_model(data: PreparedData, folder: Path) -> tuple[ElasticMoE, Path]:
    """Random weights at generate_speed.py's ~10 M-parameter shape, with a real 8,192-token BPE vocabulary."""
    torch.manual_seed(0)
    config = MoEConfig(
        vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, n_experts=8, top_k=2,
        expert_ffn_dim=256, n_shared_experts=1, max_seq_len=512,
    )  # fmt: skip
    tokenizer = train_tokenizer(data.documents(), config.vocab_size)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return ElasticMoE(config).eval(), path


def gguf_perplexity(path: Path, windows: list[np.ndarray], threads: int, context: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, n_threads=threads, verbose=False)
    nll = []
    for batch in windows:
        for window in batch.tolist():
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32))
            nll.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:])).item())
    llm.close()
    return math.exp(float(np.mean(nll)))


def llama_cpp_speed(path: Path, prompt: list[int], tokens: int, threads: int, context: int, repeats: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run() -> int:
        generated = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            generated += 1
            if generated == tokens:
                return generated
        return generated

    run()  # warm-up
    start = time.perf_counter()
    generated = sum(run() for _ in range(repeats))
    speed = generated / (time.perf_counter() - start)
    llm.close()
    return speed


def onnx_speed(path: Path, prompt: list[int], tokens: int, threads: int, context: int, repeats: int) -> float:
    package = ChatPackage(path, threads=threads)
    package.complete(prompt, tokens, EVERY_TOKEN)  # warm-up
    start = time.perf_counter()
    generated = sum(package.complete(prompt, tokens, EVERY_TOKEN).completion_tokens for _ in range(repeats))
    return generated / (time.perf_counter() - start)


ENGINES = {"onnxruntime": onnx_speed, "llama.cpp": llama_cpp_speed}


def decode_profile(path: Path, prompt: list[int], steps: int) -> tuple[float, dict[str, float]]:
    """onnxruntime kernels run per decode step after a prefill of `prompt` (its profiler's node events), and each
    operator type's share of their time."""
    import json

    import onnxruntime as ort

    package = ChatPackage(path, threads=1)
    _, past = package.generator.forward(np.asarray([prompt]), package.generator.empty_past(1))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path / "profile")
    session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    package.generator.session = session
    for _ in range(steps):
        _, past = package.generator.forward(np.asarray([[prompt[-1]]]), past)
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op: dict[str, float] = {}
    for event in kernels:
        by_op[event["args"]["op_name"]] = by_op.get(event["args"]["op_name"], 0.0) + event["dur"]
    total = sum(by_op.values()) or 1.0
    return len(kernels) / steps, {op: t / total for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}


def engine_environment(engine: str) -> dict[str, str]:
    """The environment an engine runs in, as its users run it. Importing trainonce sets GOMP_SPINCOUNT=1000 for this
    process and its children (flows/cpu_threads.py: torch's OpenMP threads then yield soon on a busy machine), and a
    llama.cpp process started from here would inherit it: its threads are OpenMP threads too. They get libgomp's own
    default back (300,000 rounds with no more threads than cores), set explicitly because the measuring process
    imports trainonce, which only sets a spin count the environment does not already hold. (Measured on the tiny
    champion: within the run-to-run noise either way.) onnxruntime's own thread pool does not read it."""
    if engine == "llama.cpp" and os.environ.get("GOMP_SPINCOUNT") == SPIN_COUNT:
        return {**os.environ, "GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPIN_COUNT}
    return dict(os.environ)


def engine_speed(engine: str, path: Path, prompt: list[int], tokens: int, threads: int, context: int) -> float:
    """Greedy tokens/s of one engine on one file, measured in a process of its own: neither engine shares thread
    pools (llama.cpp's OpenMP, onnxruntime's) or memory with the other or with the export (timed in one process,
    a first run measured our fp32 at 0.6x of what it does alone)."""
    ids = ",".join(map(str, prompt))
    command = [sys.executable, __file__, "--measure", engine, str(path), ids, str(tokens), str(threads), str(context)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=engine_environment(engine))
    return float(done.stdout.strip().splitlines()[-1])


def server_rows(
    label: str, command: list[str], url: str, clients: list[int], requests: int, max_tokens: int, engine: str
) -> list[str]:
    process = started(command, url, engine_environment(engine))
    rows = []
    try:
        for count in clients:
            wall, outcomes = load(url, count, max(requests, count), max_tokens)
            errors = [o.error for o in outcomes if o.error]
            first = [o.first_token for o in outcomes if o.first_token == o.first_token]
            rows.append(
                f"{label:<30}{count:>8}{sum(o.tokens for o in outcomes) / wall:>11,.0f}"
                f"{statistics.median(first) * 1000 if first else float('nan'):>10.0f}{len(errors):>8}"
            )
            print(rows[-1], flush=True)
            if errors:
                print("  first error:", errors[0])
    finally:
        process.terminate()
        process.wait(timeout=30)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:  # engine_speed's own process
        engine, path, ids, tokens, threads, context = sys.argv[2:8]
        prompt = [int(i) for i in ids.split(",")]
        print(ENGINES[engine](Path(path), prompt, int(tokens), int(threads), int(context), repeats=4))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="a pipeline workdir: benchmark its champion's weights")
    parser.add_argument("--shape", action="store_true", help="random weights at the ~10 M-parameter shape")
    parser.add_argument("--config", default="tiny", help="preset whose data the model was trained on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per sequence, batch 1")
    parser.add_argument("--rounds", type=int, default=3, help="engine speed measurements per pair (median)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=64, help="per number of clients")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per server request")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="what to measure (default: all)")
    args = parser.parse_args()
    if bool(args.workdir) == args.shape:
        raise SystemExit("give --workdir DIR (a trained champion) or --shape (random weights)")
    llama_cpp = find_llama_cpp()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="llama-cpp-peer-"))
    data = prepare_data(load_pipeline_config(args.config).data)
    if args.workdir:
        model = trained_model(args.workdir)
        tokenizer_path, chat_format = Path(data.tokenizer_path), data.chat_format
    else:
        model, tokenizer_path = shaped_model(data, folder)
        chat_format = ChatFormat()
    config = model.config
    print(
        f"model: {model.num_parameters():,} parameters, vocab {config.vocab_size}, d {config.d_model}, "
        f"{config.n_layers} layers, {config.n_experts} experts top-{config.top_k}; {args.threads} threads, "
        f"{os.cpu_count()} cores; llama.cpp from {llama_cpp.home}"
    )
    packages = build_packages(model, tokenizer_path, chat_format, folder / "onnx", OURS)
    traced = build_packages(model, tokenizer_path, chat_format, folder / "traced", TRACED)
    packages |= {f"traced-{v}": p for v, p in traced.items()}
    checkpoint = save_model(model, folder / "checkpoint")
    gguf = export_gguf(checkpoint, tokenizer_path, chat_format, folder / "gguf", GGUF, name="llama-cpp-peer")
    sizes = {v: (p / "model.onnx").stat().st_size for v, p in packages.items()}
    sizes |= {g: path.stat().st_size for g, path in gguf.items()}
    prompt = ChatPackage(packages["fp32"]).chat_prompt([Message(role="user", content=PROMPT)])
    if "files" in args.parts:
        files_rows(packages, sizes, prompt)
    if args.workdir and "perplexity" in args.parts:
        perplexity_rows(data, packages, gguf, args.threads, config.max_seq_len)
    if "engines" in args.parts:
        engine_rows(packages, gguf, sizes, prompt, config.max_seq_len, args)
    if "servers" in args.parts:
        server_table(packages, gguf, folder, config.max_seq_len, args)
    print(f"\nfiles in {folder}")


def files_rows(packages: dict[str, Path], sizes: dict[str, int], prompt: list[int]) -> None:
    print("\nfiles, and onnxruntime kernels per decode step with the operators' shares of their time (profiler, 1")
    print("thread, 8 steps after the prompt)")
    print(f"{'ours':<12}{'MB':>7}{'kernels':>9}   {'llama.cpp':<9}{'MB':>7}{'ours / llama.cpp':>18}   time by operator")
    for ours, theirs in PAIRS:
        kernels, shares = decode_profile(packages[ours], prompt, 8)
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:4])
        print(
            f"{ours:<12}{sizes[ours] / 1e6:>7.2f}{kernels:>9,.0f}   {theirs:<9}{sizes[theirs] / 1e6:>7.2f}"
            f"{sizes[ours] / sizes[theirs]:>17.2f}x   {top}",
            flush=True,
        )


def perplexity_rows(
    data: PreparedData, packages: dict[str, Path], gguf: dict[str, Path], threads: int, context: int
) -> None:
    windows = validation_windows(data, EvaluationConfig())
    generators = {v: ChatPackage(p, threads=threads).generator for v, p in packages.items()}
    ppl = {v: math.exp(np.mean([g.mean_nll(w) for w in windows])) for v, g in generators.items()}
    ppl |= {g: gguf_perplexity(path, windows, threads, context) for g, path in gguf.items()}
    print(f"\nvalidation perplexity ({len(windows)} batches of {windows[0].shape} tokens, the deploy stage's)")
    print(f"{'ours':<12}{'ppl':>8}{'vs fp32':>9}   {'llama.cpp':<9}{'ppl':>8}{'vs f32':>8}")
    for ours, theirs in PAIRS:
        print(
            f"{ours:<12}{ppl[ours]:>8.3f}{ppl[ours] / ppl['fp32'] - 1:>+9.2%}   "
            f"{theirs:<9}{ppl[theirs]:>8.3f}{ppl[theirs] / ppl['f32'] - 1:>+8.2%}"
        )


def engine_rows(
    packages: dict[str, Path],
    gguf: dict[str, Path],
    sizes: dict[str, int],
    prompt: list[int],
    context: int,
    args: argparse.Namespace,
) -> None:
    print(
        f"\nengine decode, batch 1, {args.new_tokens} forced tokens after a {len(prompt)}-token prompt; median of "
        f"{args.rounds} rounds, the engines alternating"
    )
    print(f"{'ours':<12}{'MB':>7}{'tok/s':>9}   {'llama.cpp':<9}{'MB':>7}{'tok/s':>9}{'ours / llama.cpp':>18}")
    for ours, theirs in PAIRS:
        mine_rounds, peer_rounds = [], []
        for _ in range(args.rounds):
            mine_rounds.append(
                engine_speed("onnxruntime", packages[ours], prompt, args.new_tokens, args.threads, context)
            )
            peer_rounds.append(engine_speed("llama.cpp", gguf[theirs], prompt, args.new_tokens, args.threads, context))
        mine, peer = statistics.median(mine_rounds), statistics.median(peer_rounds)
        print(
            f"{ours:<12}{sizes[ours] / 1e6:>7.2f}{mine:>9,.0f}   {theirs:<9}{sizes[theirs] / 1e6:>7.2f}{peer:>9,.0f}"
            f"{mine / peer:>17.2f}x",
            flush=True,
        )


def server_table(
    packages: dict[str, Path], gguf: dict[str, Path], folder: Path, context_per_slot: int, args: argparse.Namespace
) -> None:
    llama_cpp = find_llama_cpp()
    workdir = folder / "registry"
    logger = RunLogger(workdir, run_name="peer-benchmark")
    versions = {
        variant: register_chat_package(workdir, logger.run_id, packages[variant], {"quantization": variant},
                                       CHAT_PYFUNC_CODE).version
        for variant in ("fp32", "int8", "int4", "traced-fp32")
    }  # fmt: skip
    logger.finish()
    slots = max(args.clients)
    context = str(slots * context_per_slot)  # llama-server divides its context among the slots
    print(f"\nservers: {args.requests} streamed chat requests per row, {args.max_tokens} forced tokens each")
    print(f"{'server':<30}{'clients':>8}{'tok/s':>11}{'TTFT ms':>10}{'errors':>8}")
    for ours, theirs in PAIRS:
        if ours not in versions:
            continue
        port = free_port()
        server_rows(
            f"trainonce serve {ours}",
            [sys.executable, "-m", "flows.cli", "serve", "--workdir", str(workdir), "--version", versions[ours],
             "--port", str(port), "--threads", str(args.threads), "--max-batch", "32", "--max-waiting", "4096"],
            f"http://127.0.0.1:{port}", args.clients, args.requests, args.max_tokens, "onnxruntime",
        )  # fmt: skip
        port = free_port()
        server_rows(
            f"llama-server {theirs}",
            [str(llama_cpp.server), "-m", str(gguf[theirs]), "--port", str(port), "--host", "127.0.0.1", "--jinja",
             "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", context],
            f"http://127.0.0.1:{port}", args.clients, args.requests, args.max_tokens, "llama.cpp",
        )  # fmt: skip


if __name__ == "__main__":
    main()
