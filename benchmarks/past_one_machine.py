"""Pre-training past one process: 1 process against 2-process DDP, 2-process FSDP2 and two "machines", side by side.

    .venv/bin/python benchmarks/past_one_machine.py --steps 100

Trains the tiny preset's supernet (auxiliary-loss-free balancing, whose routing load is all-reduced) for `--steps`
on the bundled corpus four ways: in this process; `accelerate launch` of 2 CPU processes (gloo) holding a whole copy
each (DDP, infra/accelerate/multi-cpu.yaml); the same 2 processes each holding half of every decoder layer (FSDP2,
`pretrain.launch.sharding=fsdp2`); and infra/accelerate/multi-node.yaml as two machines of one process each on this
host (machine ranks 0 and 1, rendezvous on 127.0.0.1). Every way trains on the same global batches, so the losses
and weights must agree; prints each way's wall time (start-up included), final train and validation losses, the
largest difference from the 1-process run in any validation loss and any weight, and the first step whose train
loss differs from it by more than 1e-4.

Two processes add their half-batch gradients in another order than one process sums the whole batch, and a routed
MoE amplifies such rounding: a token whose top-k choice flips changes the step's loss by about 1/tokens. Over a long
run the ways' trajectories therefore drift apart like runs at another thread count; the 1-process run at 2 threads
(`torch.set_num_threads`, other summation orders in the kernels) is that floor, printed beside them. Run with
OMP_NUM_THREADS=1 so that every process starts from one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from flows.readiness import free_port
from tasks.common.launch import REPO, run_launched
from tasks.data.corpus import PreparedData, prepare_data
from tasks.pipeline_config import load_pipeline_config
from tasks.pretrain.config import PretrainConfig, PretrainResult
from tasks.pretrain.entry import read_result, run_pretrain_launched, write_job
from tasks.pretrain.loop import run_pretrain

MULTI_CPU = REPO / "infra" / "accelerate" / "multi-cpu.yaml"
MULTI_NODE = REPO / "infra" / "accelerate" / "multi-node.yaml"


def start_launch(command: list[str], environment: dict[str, str], log: Path) -> subprocess.Popen:
    """A launch in the background, its output in `log`."""
    env = {**os.environ, **environment, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def train_on_two_machines(config: PretrainConfig, data: PreparedData, output_dir: Path) -> PretrainResult:
    """`config` (a 2-machine launch config) run as both machines on this host: machine 1 in the background, then
    machine 0 as the pipeline runs it, both on one job file; machine 0's result."""
    job = write_job(config, data, output_dir)
    args, environment = ["--job", str(job)], config.launch.environment()
    machine_1 = start_launch(
        config.launch.command("tasks.pretrain.entry", args, machine_rank=1), environment, output_dir / "machine-1.log"
    )
    try:
        command = config.launch.command("tasks.pretrain.entry", args, machine_rank=0)
        run_launched(command, output_dir / "machine-0.log", environment)
        if machine_1.wait(timeout=600) != 0:
            raise RuntimeError(f"machine 1 failed: {(output_dir / 'machine-1.log').read_text()[-3000:]}")
    finally:
        if machine_1.poll() is None:
            machine_1.kill()
    return read_result(output_dir)


def train_with_threads(config: PretrainConfig, data: PreparedData, output_dir: Path, threads: int) -> PretrainResult:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_pretrain(config, data, output_dir)
    finally:
        torch.set_num_threads(before)


def train_losses(output_dir: Path) -> dict[int, float]:
    records = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/loss_full"] for r in records if "train/loss_full" in r}


def first_step_apart(reference: Path, other: Path, tolerance: float = 1e-4) -> str:
    first, second = train_losses(reference), train_losses(other)
    apart = [step for step in sorted(first) if abs(first[step] - second[step]) > tolerance]
    return str(apart[0]) if apart else "never"


def largest_weight_difference(first: Path, second: Path) -> float:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("runs/past-one-machine"))
    args = parser.parse_args()
    pipeline = load_pipeline_config("tiny")
    data = prepare_data(pipeline.data)
    base = pipeline.pretrain.model_dump()
    base["model"]["load_balancing"] = "bias"
    base.update(max_steps=args.steps, checkpoint_interval=args.steps, eval_interval=args.steps, log_interval=1)

    def config(**launch) -> PretrainConfig:
        return PretrainConfig.model_validate({**base, "launch": launch})

    two_cpus = {"num_processes": 2, "config_file": str(MULTI_CPU)}
    two_machines = {"num_processes": 2, "config_file": str(MULTI_NODE), "main_process_ip": "127.0.0.1"}
    ways = {
        "1 process": lambda out: run_pretrain(config(), data, out),
        "1 process, 2 threads": lambda out: train_with_threads(config(), data, out, threads=2),
        "2 processes, DDP": lambda out: run_pretrain_launched(config(**two_cpus), data, out),
        "2 processes, FSDP2": lambda out: run_pretrain_launched(config(**two_cpus, sharding="fsdp2"), data, out),
        "2 machines x 1 process": lambda out: train_on_two_machines(
            config(**two_machines, main_process_port=free_port()), data, out
        ),
    }
    print(f"$ .venv/bin/python benchmarks/past_one_machine.py --steps {args.steps}  (torch {torch.__version__})")
    print(
        "| way | processes | wall s | train loss | val loss (full) | max abs val-loss diff | max abs weight diff "
        "| train loss apart from step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    reference: PretrainResult | None = None
    for name, train in ways.items():
        out = args.workdir / name.replace(" ", "-").replace(",", "")
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)  # every way trains from scratch
        start = time.perf_counter()
        result = train(out)
        seconds = time.perf_counter() - start
        reference = reference or result
        val_diff = max(abs(result.val_loss[k] - reference.val_loss[k]) for k in reference.val_loss)
        weight_diff = largest_weight_difference(reference.checkpoint_dir, result.checkpoint_dir)
        print(
            f"| {name} | {result.processes} | {seconds:.1f} | {result.train_loss:.4f} | {result.val_loss['full']:.4f} "
            f"| {val_diff:.1e} | {weight_diff:.1e} | {first_step_apart(reference.checkpoint_dir.parent, out)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
