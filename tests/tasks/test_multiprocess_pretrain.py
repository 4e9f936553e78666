"""Pre-training in several processes matches one process on the same global batches: data parallel (DDP) on 2 CPU
processes, fully sharded (FSDP2) on 2 processes killed mid-run and resumed from its sharded checkpoint, and two
"machines" (2 launches of infra/accelerate/multi-node.yaml, machine ranks 0 and 1, rendezvous on 127.0.0.1).

Each launch is `ACCELERATE_USE_CPU=true accelerate launch --config_file ... --num_processes 2 --multi_gpu -m
tasks.pretrain.entry --job FILE` (gloo ranks on the CPU; without mpirun accelerate's own CPU launcher silently starts
one process, so each process checks that accelerate started as many as asked, and the result says how many trained).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from flows.readiness import free_port
from tasks.common.launch import REPO
from tasks.data.corpus import PreparedData
from tasks.pipeline_config import load_pipeline_config
from tasks.pretrain.checkpoint import STATE_FILE, latest_checkpoint
from tasks.pretrain.config import PretrainConfig, PretrainResult
from tasks.pretrain.entry import run_pretrain_launched, write_job
from tasks.pretrain.loop import run_pretrain

sys.path.insert(0, str(REPO / "benchmarks"))
from past_one_machine import start_launch, train_on_two_machines  # noqa: E402

MULTI_CPU = REPO / "infra" / "accelerate" / "multi-cpu.yaml"
MULTI_NODE = REPO / "infra" / "accelerate" / "multi-node.yaml"
STEPS, CHECKPOINT_EVERY = 10, 5


def _config(**launch) -> PretrainConfig:
    base = load_pipeline_config("tiny").pretrain.model_dump()
    # auxiliary-loss-free balancing: the selection biases move by the routing load, which must be the global
    # batch's (an all-reduce over processes), or the processes' models drift from the single-process one
    base["model"].update(vocab_size=400, n_layers=4, n_experts=8, load_balancing="bias")
    base["elastic"].update(depths=[2, 3, 4], expert_counts=[2, 4, 6, 8])
    base.update(
        batch_size=8,
        seq_len=64,
        max_steps=STEPS,
        log_interval=5,
        eval_interval=10,
        checkpoint_interval=CHECKPOINT_EVERY,
    )
    base["optim"]["warmup_steps"] = 2
    base["launch"] = launch
    return PretrainConfig.model_validate(base)


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, small_data: PreparedData) -> PretrainResult:
    """The single-process run every multi-process run must reproduce."""
    return run_pretrain(_config(), small_data, tmp_path_factory.mktemp("one"))


def _assert_same_training(result: PretrainResult, one: PretrainResult, weights_atol: float = 1e-5) -> None:
    assert result.config_hash == one.config_hash  # how a run is launched is not part of its identity
    assert result.steps == STEPS
    assert result.train_loss == pytest.approx(one.train_loss, abs=1e-4)
    assert result.val_loss.keys() == one.val_loss.keys()
    for label, loss in one.val_loss.items():
        assert result.val_loss[label] == pytest.approx(loss, abs=1e-4), label
    weights = sorted(one.checkpoint_dir.glob("*.safetensors"))
    assert weights
    for path in weights:
        first, second = load_file(path), load_file(result.checkpoint_dir / path.name)
        assert first.keys() == second.keys()
        for name, tensor in first.items():
            torch.testing.assert_close(second[name], tensor, atol=weights_atol, rtol=0, msg=name)


def _kill_tree(launch: subprocess.Popen) -> None:
    """SIGKILL a launch and every process under it (torchrun starts its workers in sessions of their own)."""
    processes = [psutil.Process(launch.pid), *psutil.Process(launch.pid).children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=60)
    launch.wait()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(
    tmp_path: Path, small_data: PreparedData, one: PretrainResult
) -> None:
    two = run_pretrain_launched(_config(num_processes=2, config_file=str(MULTI_CPU)), small_data, tmp_path)
    launched = (tmp_path / "launch.log").read_text()
    assert f"--config_file {MULTI_CPU} --num_processes 2 --multi_gpu -m tasks.pretrain.entry" in launched
    assert two.processes == 2 and two.checkpoint_dir == (tmp_path / "supernet").resolve()
    _assert_same_training(two, one)


@pytest.mark.slow
def test_fsdp2_on_two_processes_killed_and_resumed_matches_one_process(
    tmp_path: Path, small_data: PreparedData, one: PretrainResult
) -> None:
    config = _config(num_processes=2, config_file=str(MULTI_CPU), sharding="fsdp2")
    job = write_job(config, small_data, tmp_path)
    first = start_launch(
        config.launch.command("tasks.pretrain.entry", ["--job", str(job)]),
        config.launch.environment(),
        tmp_path / "killed.log",
    )
    deadline = time.monotonic() + 600
    while latest_checkpoint(tmp_path) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_tree(first)  # the whole launch, both ranks, as a lost machine would
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None, (tmp_path / "killed.log").read_text()[-3000:]
    assert checkpoint.name == f"step_{CHECKPOINT_EVERY:08d}", "the run was not killed before its last checkpoint"
    shards = sorted(checkpoint.glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]  # one per rank,
    assert all(p.stat().st_size > 0.4 * sum(q.stat().st_size for q in shards) for p in shards)  # each about half
    assert '"sharding": "fsdp2"' in (checkpoint / STATE_FILE).read_text()

    resumed = run_pretrain_launched(config, small_data, tmp_path)
    assert resumed.resumed_from == CHECKPOINT_EVERY and resumed.processes == 2
    # the supernet gathered from the shards is the single process's (summed in another order: a little looser)
    _assert_same_training(resumed, one, weights_atol=5e-5)


@pytest.mark.slow
def test_two_machines_match_one_process(tmp_path: Path, small_data: PreparedData, one: PretrainResult) -> None:
    """infra/accelerate/multi-node.yaml as two machines of one process each, on this host (machine 0's address
    127.0.0.1 and a free rendezvous port override the file's)."""
    config = _config(
        num_processes=2, config_file=str(MULTI_NODE), main_process_ip="127.0.0.1", main_process_port=free_port()
    )
    two = train_on_two_machines(config, small_data, tmp_path)
    assert "--machine_rank 0 --main_process_ip 127.0.0.1" in (tmp_path / "machine-0.log").read_text()
    assert two.processes == 2
    _assert_same_training(two, one)
