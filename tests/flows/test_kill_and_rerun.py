"""`trainonce pipeline` SIGKILLed midway (during pre-training after a checkpoint), run again with the same command and
killed again (during DPO), and again (during export), then run to the end: each run resumes (pre-training from its
checkpoint, which it says; finished stages and steps from Prefect's cache), the last ends with a champion, and nothing
the killed runs left behind stays Running (their Prefect flow, subflow and task runs are Crashed; their MLflow runs are
resumed or ended KILLED)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.tracking import store_client

REPO = Path(__file__).resolve().parents[2]


def _command(workdir: Path, small_corpus: Path, data_dir: Path, short: list[str]) -> list[str]:
    exe = shutil.which("trainonce", path=str(Path(sys.executable).parent))
    assert exe
    overrides = [
        *short,
        "pretrain.checkpoint_interval=5",
        "deploy.variants=[fp32]",
        "deploy.hugging_face=false",
        f"data.source={small_corpus}",
        f"data.data_dir={data_dir}",
    ]
    return [exe, "pipeline", "--workdir", str(workdir), *(a for o in overrides for a in ("--set", o))]


# Run in a fresh process: Prefect's temporary server is a singleton of the process that starts it, so a second test
# in this process would read the first test's database through it.
_READ_RECORD = """
import json, sys
from pathlib import Path
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from flows.cli import local_prefect_settings

summaries = ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-summary"]))
with local_prefect_settings(Path(sys.argv[1])), get_client(sync_client=True) as client:
    runs = client.read_flow_runs(limit=200) + client.read_task_runs(limit=200)
    artifacts = [str(a.data) for a in client.read_artifacts(artifact_filter=summaries)]
print(json.dumps({"states": [[run.name, run.state_type.value] for run in runs], "summaries": artifacts}))
"""


def _prefect_record(workdir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, state type) of every flow and task run, and the pipeline-summary artifacts, read through a temporary
    server on the workdir's own Prefect database (a short pipeline has fewer than 200 of each)."""
    done = subprocess.run(
        [sys.executable, "-c", _READ_RECORD, str(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    record = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"states"')))
    return [(name, state) for name, state in record["states"]], record["summaries"]


# where each run is killed: as soon as this appears in its workdir
KILL_POINTS = {
    "pretraining": "pretrain/*/checkpoints/step_*",  # after a checkpoint: pre-training resumes from it
    # the DPO step fetched the SFT step's model: search, extraction and SFT come from the cache
    "dpo": "registry-cache/*/trainonce-chat-torch/*",
    "export": "export/*",  # the export task started: alignment comes from the cache too
}


def _run_until(command: list[str], env: dict[str, str], workdir: Path, pattern: str, log_path: Path) -> str:
    """Start the pipeline, SIGKILL it (the flow process and its temporary Prefect server, no warning) as soon as
    `pattern` appears in the workdir; returns what it printed."""
    with log_path.open("w") as log:
        run = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while not list(workdir.glob(pattern)):
            assert run.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the run never reached {pattern}"
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    return log_path.read_text()


@pytest.mark.slow
def test_a_pipeline_killed_at_each_stage_in_turn_resumes_each_time(
    tmp_path: Path, small_corpus: Path, short_pipeline: list[str]
) -> None:
    """Killed during pre-training, then (run again) during DPO, then during export; the fourth run completes. One
    workdir throughout, so each run resumes from what all the killed ones left."""
    workdir = tmp_path / "pipeline"
    command = _command(workdir, small_corpus, tmp_path / "data", short_pipeline)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    _run_until(command, env, workdir, KILL_POINTS["pretraining"], tmp_path / "killed-pretraining.log")
    resumed = _run_until(command, env, workdir, KILL_POINTS["dpo"], tmp_path / "killed-dpo.log")
    assert "pre-training resumes at step" in resumed and "resumed from its checkpoint at step" in resumed
    after_dpo = _run_until(command, env, workdir, KILL_POINTS["export"], tmp_path / "killed-export.log")
    assert "resumes at step" not in after_dpo  # pre-training came from the cache

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumes at step" not in again.stdout + again.stderr
    client = store_client(workdir)
    champion = client.get_model_version_by_alias("trainonce-chat", "champion")
    assert str(champion.version) == "1"
    supernets = client.search_model_versions("name='trainonce-supernet'")
    assert len(supernets) == 1  # trained once, across the kill during pre-training and the ones after it
    assert int(supernets[0].tags["resumed_from_step"]) >= 5
    assert len(client.search_model_versions("name='trainonce-subnet'")) == 1  # extraction came from the cache
    aligned = client.search_model_versions("name='trainonce-chat-torch'")
    assert sorted(v.tags["stage"] for v in aligned) == ["dpo", "sft"]  # SFT ran once, across the kill during DPO
    experiment = client.get_experiment_by_name("trainonce").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    states, summaries = _prefect_record(workdir)
    assert not [(name, state) for name, state in states if state in ("RUNNING", "PENDING")], states
    assert sum(state == "CRASHED" for _, state in states) >= 6, states  # 3 killed pipeline runs and their stages
    names = {name for name, _ in states}
    assert {f"{stage}: {workdir.parent.name}/pipeline" for stage in ("pipeline", "pretrain", "deploy")} <= names
    # the completed pipeline run's own artifacts hold what it produced, as the command printed it
    assert len(summaries) == 1 and "trainonce-chat@champion = version 1" in summaries[0]
