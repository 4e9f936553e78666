"""A pre-training process killed with SIGKILL resumes from its last checkpoint, exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from registry.tracking import store_client

STEPS, CHECKPOINT_EVERY = 60, 10


def _command(corpus: Path, data_dir: Path, output_dir: Path, tracking_dir: Path | None) -> list[str]:
    overrides = {
        "data.source": str(corpus),
        "data.data_dir": str(data_dir),
        "data.vocab_size": 400,
        "pretrain.model.vocab_size": 400,
        "pretrain.model.n_layers": 4,  # a smaller supernet than the preset's: the same loop, half the time
        "pretrain.model.n_experts": 8,
        "pretrain.elastic.depths": "[2,3,4]",
        "pretrain.elastic.expert_counts": "[2,4,6,8]",
        "pretrain.max_steps": STEPS,
        "pretrain.batch_size": 8,
        "pretrain.seq_len": 64,
        "pretrain.log_interval": 5,
        "pretrain.eval_interval": 20,
        "pretrain.checkpoint_interval": CHECKPOINT_EVERY,
        "pretrain.keep_checkpoints": 10,
        "pretrain.optim.warmup_steps": 5,
    }
    command = [sys.executable, "-m", "tasks.pretrain.entry", "--config", "tiny", "--output-dir", str(output_dir)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    if tracking_dir is not None:
        command += ["--tracking-dir", str(tracking_dir)]
    return command


def _env() -> dict[str, str]:
    # the same thread count in every process, so the resumed run computes bit for bit what the reference did
    return {**os.environ, "OMP_NUM_THREADS": "2", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}


def _run_to_end(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train_losses(output_dir: Path) -> dict[int, float]:
    records = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/loss_full"] for r in records if "train/loss_full" in r}


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path, small_corpus: Path) -> None:
    data_dir = tmp_path / "data"
    reference_dir, killed_dir, tracking = tmp_path / "reference", tmp_path / "killed", tmp_path / "mlflow"
    reference = _run_to_end(_command(small_corpus, data_dir, reference_dir, None))
    assert reference["resumed_from"] == 0

    process = subprocess.Popen(
        _command(small_corpus, data_dir, killed_dir, tracking),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_checkpoint = killed_dir / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}"
    deadline = time.monotonic() + 300
    while not first_checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "the run must be killed before it finishes"
    assert not (killed_dir / "supernet").exists()
    steps_done = sorted(int(p.name.split("_")[1]) for p in (killed_dir / "checkpoints").glob("step_????????"))
    assert steps_done and steps_done[-1] < STEPS

    resumed = _run_to_end(_command(small_corpus, data_dir, killed_dir, tracking))
    assert resumed["resumed_from"] == steps_done[-1]
    assert resumed["steps"] == STEPS

    # the loss curve continues: every logged step equals the uninterrupted run's, none is missing or doubled
    assert _train_losses(killed_dir) == pytest.approx(_train_losses(reference_dir), abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
    ours, theirs = (load_file(str(d / "supernet" / "model.safetensors")) for d in (killed_dir, reference_dir))
    assert all((ours[k] - theirs[k]).abs().max() <= 1e-6 for k in theirs)

    # MLflow: one run, resumed, whose metric history covers every step; a step logged by the killed process
    # after its last checkpoint is logged again on resume with the same value
    client = store_client(tracking)
    runs = client.search_runs([client.get_experiment_by_name("trainonce").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    history: dict[int, set[float]] = {}
    for metric in client.get_metric_history(runs[0].info.run_id, "train/loss_full"):
        history.setdefault(metric.step, set()).add(round(metric.value, 5))
    assert sorted(history) == list(range(5, STEPS + 1, 5))
    assert all(len(values) == 1 for values in history.values())
    assert runs[0].data.tags["resumed_from_step"] == str(steps_done[-1])  # the resume is on the record
    assert "trainonce.ended_by" not in runs[0].data.tags  # the run it resumed was not ended as an orphan
