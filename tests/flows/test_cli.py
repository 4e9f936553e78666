"""The installed `trainonce` console script, run as a user runs it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry.tracking import store_client

REPO = Path(__file__).resolve().parents[2]


def _trainonce(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = shutil.which("trainonce", path=str(Path(sys.executable).parent))
    assert exe, "the trainonce console script is installed with the package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands() -> None:
    result = _trainonce("--help")
    assert result.returncode == 0
    for command in ("pipeline", "prepare-data", "pretrain", "info", "serve", "promote", "rollback"):
        assert command in result.stdout


def test_info_prints_the_family_accounting() -> None:
    result = _trainonce("info", "--config", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["supernet", "1,399,616", "367,424"]
    assert len(lines) == 2 + 4 * 4 * 2  # header + supernet + depths x expert counts x top-k


def test_bad_override_fails_naming_the_field() -> None:
    result = _trainonce("info", "--set", "pretrain.model.top_k=99")
    assert result.returncode != 0
    assert "top_k=99 must be <= the experts of layer 0 (16)" in result.stderr


@pytest.mark.slow
def test_pipeline_runs_prefect_flow_end_to_end(tmp_path: Path, small_corpus: Path) -> None:
    """The README's main command on a shortened tiny config: a real temporary Prefect server, a real MLflow
    store, a registered supernet version with its lineage and per-sub-model validation curves, and a
    registered sub-model within ERNIE 5.1's budgets (<= 34% of the parameters, <= 50% active), then SFT and
    DPO versions of it with their lineage and per-task accuracies, then the ONNX variants and a
    `trainonce-chat` version that the gate made champion."""
    workdir = tmp_path / "pipeline"
    result = _trainonce(
        "pipeline",
        "--config",
        "configs/tiny.yaml",
        "--workdir",
        str(workdir),
        "--set",
        f"data.source={small_corpus}",
        "--set",
        f"data.data_dir={tmp_path / 'data'}",
        "--set",
        "data.vocab_size=400",
        "--set",
        "pretrain.model.vocab_size=400",
        "--set",
        "pretrain.max_steps=20",
        "--set",
        "pretrain.optim.warmup_steps=2",
        "--set",
        "pretrain.eval_interval=10",
        "--set",
        "extract.distill_compute_fraction=0.3",  # 6% of 20 steps' compute would be less than one step
        "--set",
        "sft.steps=20",
        "--set",
        "sft.tasks.train_per_task=20",
        "--set",
        "sft.tasks.test_per_task=4",
        "--set",
        "sft.replay_batch_size=2",
        "--set",
        "dpo.steps=5",
        "--set",
        "deploy.evaluation.val_batches=2",
        "--set",
        "deploy.evaluation.speed_prompts=1",
        "--set",
        "deploy.evaluation.speed_new_tokens=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "supernet registered as models:/trainonce-supernet/1" in result.stdout

    client = store_client(workdir)
    version = client.get_model_version("trainonce-supernet", "1")
    for tag in ("data_fingerprint", "config_hash", "git_commit", "val_loss/full", "val_loss/L3_E4_k1"):
        assert version.tags.get(tag), tag
    run = client.get_run(version.run_id)
    assert run.data.params["pretrain.model.d_model"] == "64"
    for label in ("full", "L3_E4_k1", "L4_E12_k1", "L6_E8_k1"):  # the panel, smallest to largest
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"val_loss/{label}")]
        assert steps == [10, 20], label
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert "plots/loss_curve.png" in plots and "plots/routing_heatmap.png" in plots

    subnet = client.get_model_version("trainonce-subnet", "1")
    assert subnet.tags["parent_supernet_version"] == "1"
    assert float(subnet.tags["total_params_fraction"]) <= 0.34
    assert float(subnet.tags["active_params_fraction"]) <= 0.5
    assert 0 < float(subnet.tags["distill_compute_fraction"]) <= 0.3
    assert int(subnet.tags["distill_steps"]) >= 1
    spec = json.loads(subnet.tags["subnet_spec"])
    assert len(spec["layers"]) == 3 and spec["top_k"] == 1
    search_runs = client.search_runs([run.info.experiment_id], "tags.stage = 'search'")
    assert "plots/pareto.png" in [a.path for a in client.list_artifacts(search_runs[0].info.run_id, "plots")]

    sft, dpo = (client.get_model_version("trainonce-chat-torch", v) for v in ("1", "2"))
    assert (sft.tags["stage"], dpo.tags["stage"]) == ("sft", "dpo")
    assert sft.tags["parent_subnet_version"] == dpo.tags["parent_subnet_version"] == "1"
    assert dpo.tags["parent_sft_version"] == "1"
    for task in ("arithmetic", "copy", "reverse", "sort", "span", "overall"):
        assert 0.0 <= float(dpo.tags[f"dpo_accuracy/{task}"]) <= 1.0
    assert 0.0 <= float(dpo.tags["reward_accuracy"]) <= 1.0

    chat = client.get_model_version("trainonce-chat", "1")
    assert set(client.get_registered_model("trainonce-chat").aliases) == {"candidate", "champion"}
    assert chat.tags["parent_model"] == "models:/trainonce-chat-torch/2"
    assert chat.tags["parent_subnet"] == "models:/trainonce-subnet/1"
    assert chat.tags["parent_supernet"] == "models:/trainonce-supernet/1"
    assert chat.tags["quantization"] in ("fp32", "int8", "int4")
    assert chat.tags["gate.decision"] == "promoted" and chat.tags["gate.champion_version"] == "none"
    evaluation = json.loads(chat.tags["evaluation"])
    assert set(evaluation) == {"fp32", "int8", "int4"}
    assert "trainonce-chat@champion = version 1" in result.stdout
