"""Running a training entry point in several processes with `accelerate launch`.

A Prefect task runs in one process; data-parallel training needs one process per device (or several CPU
processes with gloo). The pre-training task therefore hands its job to `accelerate launch -m tasks.pretrain.task
--job FILE` when more than one process is asked for, and reads the result back from the job's folder. The
accelerate config file (infra/accelerate/*.yaml) carries what accelerate owns: multi-GPU, multi-node, mixed
precision backends, rendezvous.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parents[2]


class LaunchConfig(BaseModel):
    """How many processes train, and the accelerate config that places them (results do not depend on it)."""

    model_config = ConfigDict(extra="forbid")

    num_processes: int = Field(
        1, ge=1, le=65_536, description="Training processes (GPUs, or CPU processes with gloo); 1 runs in-process."
    )
    config_file: str | None = Field(
        None,
        description="An `accelerate config` YAML (e.g. infra/accelerate/multi-gpu.yaml or multi-node.yaml); "
        "None: all processes on this machine, on its GPUs or, without one, on the CPU.",
    )
    sharding: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="How the processes hold the model: `ddp`, a whole copy each (DistributedDataParallel); `fsdp2`, "
        "each holds 1/N of every decoder layer's weights, gradients and optimizer state (torch FSDP2 "
        "`fully_shard`), for a supernet too large for one device. Same losses either way; checkpoints are sharded "
        "(torch.distributed.checkpoint) under fsdp2, so a run resumes with the sharding it started with.",
    )
    main_process_ip: str | None = Field(
        None, description="Address of machine 0 for a multi-machine launch (overrides the config file's)."
    )
    main_process_port: int | None = Field(
        None, ge=1, le=65_535, description="Rendezvous port on machine 0 (overrides the config file's)."
    )

    @property
    def in_process(self) -> bool:
        return self.num_processes == 1 and self.config_file is None

    def command(self, module: str, args: list[str], machine_rank: int | None = None) -> list[str]:
        """The `accelerate launch` command line running `python -m module args` in every process of this machine
        (`machine_rank`: which machine of a multi-machine config runs it; None: the config file's)."""
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.config_file is not None:
            path = Path(self.config_file)
            if not path.is_file():
                raise FileNotFoundError(f"pretrain.launch.config_file: {path} does not exist")
            kind = (yaml.safe_load(path.read_text()) or {}).get("distributed_type")
            if kind in ("FSDP", "DEEPSPEED"):  # accelerate would shard a model the loop does not hand it
                raise ValueError(
                    f"pretrain.launch.config_file: {path} has distributed_type {kind}, accelerate's own sharding, "
                    "which the pre-training loop does not use: set pretrain.launch.sharding=fsdp2 with a MULTI_GPU "
                    "config (e.g. infra/accelerate/multi-gpu.yaml or multi-node.yaml)"
                )
            command += ["--config_file", str(path.resolve())]
        command += ["--num_processes", str(self.num_processes)]
        if machine_rank is not None:
            command += ["--machine_rank", str(machine_rank)]
        if self.main_process_ip is not None:
            command += ["--main_process_ip", self.main_process_ip]
        if self.main_process_port is not None:
            command += ["--main_process_port", str(self.main_process_port)]
        if not torch.cuda.is_available():
            # accelerate starts several CPU processes only through mpirun; without it `--cpu` (or a MULTI_CPU config)
            # silently starts one. Its torchrun launcher starts them all, as gloo ranks on the CPU, once
            # ACCELERATE_USE_CPU is set (`environment`; huggingface/accelerate#2741).
            command.append("--multi_gpu" if self.num_processes > 1 else "--cpu")
        return [*command, "-m", module, *args]

    def environment(self) -> dict[str, str]:
        """What the launched processes need in their environment besides ours."""
        return {} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "true"}


def run_launched(command: list[str], log_path: Path, environment: dict[str, str] | None = None) -> None:
    """Run a launch command from the repository root (with `environment` added to ours), echoing its output and
    keeping it in `log_path`; a failure raises with the end of that output, which names the failing process's
    error."""
    tail: deque[str] = deque(maxlen=40)
    env = {
        **os.environ,
        **(environment or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line)
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"`{' '.join(command)}` exited with {code}; last output:\n{''.join(tail)}")
