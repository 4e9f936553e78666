"""Pre-training in several processes, both sides: `run_pretrain_launched` starts them (accelerate launch) for a caller
that is one process (the Prefect task), and this module is the entry point of each of them: `accelerate launch -m
tasks.pretrain.entry --config tiny` (a preset, for a cluster job), or `--job job.json` (what run_pretrain_launched
writes). It is orchestration (it opens the MLflow run), so it sits beside task.py outside the algorithm contract.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from models.publish import staged_file
from registry.tracking import run_opener
from tasks.common.launch import run_launched
from tasks.common.tracker import OpenRun
from tasks.data.corpus import PreparedData
from tasks.pretrain.config import PretrainConfig, PretrainResult
from tasks.pretrain.loop import run_pretrain


def pretrain_run(tracking_dir: str | Path | None) -> OpenRun | None:
    """The MLflow run pre-training logs to in `tracking_dir`'s store (None: no tracking)."""
    return None if tracking_dir is None else run_opener(tracking_dir, "pretrain", {"stage": "pretrain"})


def _run_job(path: Path) -> None:
    """One process of `run_pretrain_launched`: the main process writes the result next to the job."""
    job = json.loads(path.read_text())
    config = PretrainConfig.model_validate(job["pretrain"])
    # the state the loop's Accelerator will share (it reads ACCELERATE_USE_CPU the same way)
    started = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).num_processes
    if started != config.launch.num_processes:  # e.g. a CPU launch that fell back to one process
        raise RuntimeError(
            f"accelerate started {started} process(es) but pretrain.launch.num_processes="
            f"{config.launch.num_processes}: check pretrain.launch.config_file"
        )
    data = PreparedData.load(job["data_dir"])
    result = run_pretrain(
        config, data, path.parent, pretrain_run(job["tracking_dir"]), job["init_from"], job["init_label"]
    )
    if PartialState().is_main_process:
        payload = {
            **asdict(result),
            "checkpoint_dir": str(result.checkpoint_dir),
            "loss_curve": str(result.loss_curve) if result.loss_curve else None,
        }
        with staged_file(path.parent / "result.json") as staged:  # read by the launcher: whole, or not there
            staged.write_text(json.dumps(payload, indent=2))
    # every process leaves the group before exiting: without it a multi-machine run's rank 0 was seen to abort
    # (SIGABRT) at exit after finishing its work
    PartialState().destroy_process_group()


def write_job(
    config: PretrainConfig,
    data: PreparedData,
    output_dir: str | Path,
    tracking_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    init_label: str = "",
) -> Path:
    """Write the job every launched process reads (`--job`), on every machine of a multi-machine launch (the
    folder must be on a filesystem they share), and clear the previous result."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "pretrain": config.model_dump(mode="json"),
        "data_dir": str(data.directory.resolve()),
        "tracking_dir": str(Path(tracking_dir).resolve()) if tracking_dir is not None else None,
        "init_from": str(init_from) if init_from is not None else None,
        "init_label": init_label,
    }
    path = output_dir / "job.json"
    with staged_file(path) as staged:  # every process reads it: never half of it
        staged.write_text(json.dumps(job, indent=2))
    (output_dir / "result.json").unlink(missing_ok=True)
    return path


def read_result(output_dir: str | Path) -> PretrainResult:
    """What the main process of a launched job wrote."""
    result = json.loads((Path(output_dir) / "result.json").read_text())
    return PretrainResult(
        **{
            **result,
            "checkpoint_dir": Path(result["checkpoint_dir"]),
            "loss_curve": Path(result["loss_curve"]) if result["loss_curve"] else None,
        }
    )


def run_pretrain_launched(
    config: PretrainConfig,
    data: PreparedData,
    output_dir: str | Path,
    tracking_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    init_label: str = "",
) -> PretrainResult:
    """`run_pretrain` in `config.launch.num_processes` processes (accelerate launch), for a caller that is one
    process (a Prefect task). The job and its result travel as JSON files in `output_dir`. Under a multi-machine
    config this launches machine 0's processes; every other machine runs `config.launch.command(...,
    machine_rank=r)` on the same job file."""
    job = write_job(config, data, output_dir, tracking_dir, init_from, init_label)
    command = config.launch.command("tasks.pretrain.entry", ["--job", str(job)])
    run_launched(command, job.parent / "launch.log", config.launch.environment())
    return read_result(job.parent)


def main() -> None:
    """Entry point for `accelerate launch -m tasks.pretrain.entry --config tiny` (and for `--job`, see above)."""
    # Imported here: tasks.pipeline_config imports this module for PretrainConfig.
    from tasks.data.corpus import prepare_data
    from tasks.pipeline_config import load_pipeline_config, parse_overrides

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--output-dir", default="runs/pretrain", help="checkpoints and the final supernet")
    parser.add_argument("--tracking-dir", default=None, help="MLflow embedded store folder (default: no MLflow)")
    parser.add_argument("--job", type=Path, default=None, help="a job.json written by run_pretrain_launched")
    args = parser.parse_args()
    if args.job is not None:
        _run_job(args.job)
        return
    config = load_pipeline_config(args.config, parse_overrides(args.set))
    state = PartialState()
    with state.main_process_first():  # one process tokenizes; the others then find its dataset on disk
        data = prepare_data(config.data)
    result = run_pretrain(config.pretrain, data, args.output_dir, pretrain_run(args.tracking_dir))
    if state.is_main_process:
        print(json.dumps({"steps": result.steps, "resumed_from": result.resumed_from, "val_loss": result.val_loss}))


if __name__ == "__main__":
    main()
