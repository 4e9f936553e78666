"""The README's main command, `trainonce pipeline`, end to end and unchanged against a real `mlflow server`
(SQLite database) whose artifacts live in an S3 bucket (SeaweedFS), with the corpus read from S3 too. (The
embedded default store runs end to end in test_deployments.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from flows import local_stack
from models.checkpoint import load_model
from registry.models import download_checkpoint
from registry.tracking import active_store, store_client

REPO = Path(__file__).resolve().parents[2]
ARTIFACT_BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a SQLite database, proxying artifacts to s3://mlflow-artifacts/runs with the pipeline
    identity's credentials (the bucket is created by the test: its absence is part of what is tested)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    env = {**os.environ, **s3_server.env()}
    store = f"sqlite:///{folder / 'mlflow.db'}"
    with local_stack.mlflow_server(store, f"s3://{ARTIFACT_BUCKET}/runs", folder, env) as url:
        yield url


def _pipeline(env: dict[str, str], workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    exe = shutil.which("trainonce", path=str(Path(sys.executable).parent))
    assert exe
    command = [exe, "pipeline", "--config", "configs/tiny.yaml", "--workdir", str(workdir)]
    command += [arg for override in overrides for arg in ("--set", override)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tracking_server_with_s3_artifacts(
    s3_server,
    mlflow_server: str,
    small_corpus: Path,
    short_pipeline: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shortened tiny config: it stops before any compute while the artifact bucket is missing, then, once the
    bucket exists, registers a supernet version with its lineage and per-sub-model validation curves, a
    sub-model within ERNIE 5.1's budgets (<= 34% of the parameters, <= 50% active), SFT and DPO versions with
    their lineage and per-task accuracies, the ONNX variants and a `trainonce-chat` version that the gate made
    champion; the models come back from the bucket through the server to a client with no S3 credentials."""
    admin = s3_server.client()
    admin.create_bucket(Bucket="corpora")
    for path in sorted(small_corpus.glob("*.txt")):
        admin.upload_file(str(path), "corpora", f"plays/{path.name}")
    # The pipeline process: the tracking server's address, and S3 credentials only for reading the corpus.
    env = {**os.environ, **s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server}
    workdir = tmp_path / "pipeline"
    overrides = [*short_pipeline, "data.source=s3://corpora/plays", f"data.data_dir={tmp_path / 'data'}"]

    refused = _pipeline(env, workdir, *overrides)
    assert refused.returncode != 0
    assert f"s3://{ARTIFACT_BUCKET}/runs: The specified bucket does not exist" in refused.stdout + refused.stderr
    assert not (workdir / "pretrain").exists()  # stopped before any compute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = store_client(workdir)
    assert client.search_registered_models() == []

    admin.create_bucket(Bucket=ARTIFACT_BUCKET)
    done = _pipeline(env, workdir, *overrides)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "trainonce-chat@champion = version 1" in done.stdout
    assert f"MLflow tracking server: {mlflow_server}" in done.stdout
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()  # all on the server
    assert "supernet registered as models:/trainonce-supernet/1" in done.stdout
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
    assert "trainonce-chat@champion = version 1" in done.stdout

    keys = [
        o["Key"]
        for page in admin.get_paginator("list_objects_v2").paginate(Bucket=ARTIFACT_BUCKET)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("plots/loss_curve.png") for k in keys)
    assert sum(k.endswith("MLmodel") for k in keys) >= 5  # supernet, sub-model, SFT, DPO, chat package
    assert any(k.endswith(".onnx") for k in keys)

    # Back from the bucket through the server, by a client without S3 credentials.
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    supernet = download_checkpoint(tmp_path / "client", "trainonce-supernet/1")
    trained = load_model(next((workdir / "pretrain").glob("*/supernet"))).state_dict()
    downloaded = load_model(supernet.checkpoint_dir).state_dict()
    assert downloaded.keys() == trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(downloaded[name], tensor, rtol=0, atol=0, msg=name)
    with active_store(tmp_path / "client"):
        chat = mlflow.pyfunc.load_model("models:/trainonce-chat@champion")
    answer = chat.predict(
        pd.DataFrame({"messages": [[{"role": "user", "content": "Repeat: king queen"}]], "max_tokens": [4]})
    )
    assert answer.loc[0, "finish_reason"] in ("stop", "length") and 1 <= answer.loc[0, "completion_tokens"] <= 4

    # The same aligned model as a transformers directory (trainonce-chat-hf), with the ONNX candidate's lineage,
    # loaded back through the server as a text-generation pipeline that computes what the checkpoint computes.
    assert "transformers directory registered as models:/trainonce-chat-hf/1" in done.stdout
    hf_version = client.get_model_version("trainonce-chat-hf", "1")
    onnx_version = client.get_model_version("trainonce-chat", "1")
    assert hf_version.tags["parent_model"] == "models:/trainonce-chat-torch/2" == onnx_version.tags["parent_model"]
    assert hf_version.tags["parent_supernet"] == "models:/trainonce-supernet/1"
    with active_store(tmp_path / "client"):
        generator = mlflow.transformers.load_model("models:/trainonce-chat-hf/1")
    aligned = load_model(download_checkpoint(tmp_path / "client", "trainonce-chat-torch/2").checkpoint_dir).eval()
    tokens = torch.randint(6, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (generator.model(tokens).logits - aligned(tokens).logits).abs().max().item() <= 1e-4
