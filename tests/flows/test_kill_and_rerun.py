"""`trainonce pipeline` SIGKILLed midway (during pre-training after a checkpoint, during SFT, during export), then run
again with the same command: it resumes (pre-training from its checkpoint, which it says; finished stages from
Prefect's cache), ends with a champion, and nothing the killed run left behind stays Running (its Prefect flow,
subflow and task runs are Crashed; its MLflow runs are resumed or ended KILLED)."""

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


# where the first run is killed: as soon as this appears in its workdir
KILL_POINTS = {
    "pretraining": "pretrain/*/checkpoints/step_*",  # after a checkpoint: pre-training resumes from it
    "sft": "align/subnet-v*",  # the align task started: search and extraction come from the cache
    "export": "export/*",  # the export task started: alignment comes from the cache too
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_pipeline_killed_midway_resumes_when_run_again(
    point: str, tmp_path: Path, small_corpus: Path, short_pipeline: list[str]
) -> None:
    workdir = tmp_path / "pipeline"
    command = _command(workdir, small_corpus, tmp_path / "data", short_pipeline)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "killed.log").open("w")
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while not list(workdir.glob(KILL_POINTS[point])):
        assert first.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached {point}"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the flow process and its temporary Prefect server, no warning
    first.wait(timeout=60)
    log.close()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = again.stdout + again.stderr
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client = store_client(workdir)
    champion = client.get_model_version_by_alias("trainonce-chat", "champion")
    assert str(champion.version) == "1"
    supernets = client.search_model_versions("name='trainonce-supernet'")
    assert len(supernets) == 1  # trained once, whether the kill came during or after pre-training
    if point == "pretraining":
        assert "pre-training resumes at step" in output and "resumed from its checkpoint at step" in output
        assert int(supernets[0].tags["resumed_from_step"]) >= 5
    else:
        assert "resumes at step" not in output
        assert len(client.search_model_versions("name='trainonce-subnet'")) == 1  # extraction came from the cache
    experiment = client.get_experiment_by_name("trainonce").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    states, summaries = _prefect_record(workdir)
    assert not [(name, state) for name, state in states if state in ("RUNNING", "PENDING")], states
    assert sum(state == "CRASHED" for _, state in states) >= 2, states  # the killed pipeline run and its stage
    names = {name for name, _ in states}
    assert {f"{stage}: {workdir.parent.name}/pipeline" for stage in ("pipeline", "pretrain", "deploy")} <= names
    # the pipeline run's own artifacts hold what it produced, as the command printed it
    assert len(summaries) == 1 and "trainonce-chat@champion = version 1" in summaries[0]
