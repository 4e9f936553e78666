"""Data-parallel pre-training: with `pretrain.launch` = 2 processes and infra/accelerate/multi-cpu.yaml the task
runs `ACCELERATE_USE_CPU=true accelerate launch --config_file infra/accelerate/multi-cpu.yaml --num_processes 2
--multi_gpu -m tasks.pretrain.entry` (two gloo ranks on the CPU; each process checks that accelerate started as many
as asked, since its CPU launcher silently starts one without mpirun) on the same global batches as one process, so
losses and weights after N steps match the single-process run."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.data.corpus import PreparedData
from tasks.pipeline_config import load_pipeline_config
from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.entry import run_pretrain_launched
from tasks.pretrain.loop import run_pretrain

MULTI_CPU = Path(__file__).resolve().parents[2] / "infra" / "accelerate" / "multi-cpu.yaml"


def _config(processes: int) -> PretrainConfig:
    base = load_pipeline_config("tiny").pretrain.model_dump()
    # auxiliary-loss-free balancing: the selection biases move by the routing load, which must be the global
    # batch's (an all-reduce over processes), or the processes' models drift from the single-process one
    base["model"].update(vocab_size=400, n_layers=4, n_experts=8, load_balancing="bias")
    base["elastic"].update(depths=[2, 3, 4], expert_counts=[2, 4, 6, 8])
    base.update(batch_size=8, seq_len=64, max_steps=10, log_interval=5, eval_interval=10, checkpoint_interval=10)
    base["optim"]["warmup_steps"] = 2
    if processes > 1:
        base["launch"] = {"num_processes": processes, "config_file": str(MULTI_CPU)}
    return PretrainConfig.model_validate(base)


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path: Path, small_data: PreparedData) -> None:
    one = run_pretrain(_config(1), small_data, tmp_path / "one")
    two = run_pretrain_launched(_config(2), small_data, tmp_path / "two")
    assert one.config_hash == two.config_hash  # the process count is not part of the run's identity
    launched = (tmp_path / "two" / "launch.log").read_text()
    assert f"--config_file {MULTI_CPU} --num_processes 2 --multi_gpu -m tasks.pretrain.entry" in launched
    assert two.steps == 10 and two.checkpoint_dir == (tmp_path / "two" / "supernet").resolve()

    assert two.train_loss == pytest.approx(one.train_loss, abs=1e-4)
    assert two.val_loss.keys() == one.val_loss.keys()
    for label, loss in one.val_loss.items():
        assert two.val_loss[label] == pytest.approx(loss, abs=1e-4), label
    weights = sorted(one.checkpoint_dir.glob("*.safetensors"))
    assert weights
    for path in weights:
        first, second = load_file(path), load_file(two.checkpoint_dir / path.name)
        assert first.keys() == second.keys()
        for name, tensor in first.items():
            torch.testing.assert_close(second[name], tensor, atol=1e-5, rtol=0, msg=name)
