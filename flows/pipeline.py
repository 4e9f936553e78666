"""The `pipeline` Prefect flow: the stage flows in order, each started from the registered model the stage
before it produced: data and elastic pre-training -> search and extraction -> SFT and DPO -> ONNX export,
quantization and the gate that promotes `trainonce-chat@champion`; then, for each member of `family`, the same from
the search on, into `trainonce-chat-<member>`.

Its parameter is the pydantic PipelineConfig, so the Prefect UI renders it as a form and rejects bad values
before a run starts. Stages pass registered model URIs, never tensors; every task caches on its inputs, so
a re-run with the same config and data finishes in seconds and a crashed run resumes after its last
finished stage (flows/stages.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.run_guard import guarded_flow, run_name
from flows.stages import align_flow, checked_workdir, deploy_flow, extract_flow, pretrain_flow
from registry.tracking import ui_hint
from tasks.common.stage_results import (
    AlignedModels,
    DeploymentResult,
    ExtractionResult,
    FamilyMemberResult,
    PipelineResult,
    PretrainedSupernet,
)
from tasks.data.config import DataConfig
from tasks.data.task import prepare_data_task
from tasks.deploy.config import DeployConfig
from tasks.deploy.llama_cpp import check_gguf_request
from tasks.init_from.task import adapt_config, init_source_task
from tasks.pipeline_config import PipelineConfig
from tasks.pretrain.task import retrain_data_task
from tasks.search.config import SearchConfig

STAGES = 4


@contextmanager
def stage(number: int, what: str, total: int = STAGES) -> Iterator[None]:
    """Log a stage's start and end in the pipeline run's own log (its subflows log elsewhere), so that the run's
    log in the UI or `prefect flow-run logs` shows where the pipeline is."""
    print(f"stage {number}/{total} ({what}) starts")
    start = time.monotonic()
    yield
    print(f"stage {number}/{total} ({what}) done in {time.monotonic() - start:.0f} s")


def deploy_member(
    search: SearchConfig,
    deploy: DeployConfig,
    pretrained: PretrainedSupernet,
    data: DataConfig,
    config: PipelineConfig,
    workdir: str,
    member: str | None = None,
    progress: Callable[[str], AbstractContextManager] = lambda _what: nullcontext(),
) -> tuple[ExtractionResult, AlignedModels, DeploymentResult]:
    """One member of the family from the supernet, the main one or a `family` member alike: searched under
    `search`'s budgets, extracted, aligned, exported and gated into `deploy.model_name`. `progress(what)` wraps
    each of the three parts (the main member logs them as numbered pipeline stages)."""
    with progress("search and extraction"):
        extraction = extract_flow(
            pretrained.model_uri, data, config.importance, search, config.extract, workdir, pretrained.data_dir
        )
        print(f"sub-model {extraction.subnet.subnet}: {extraction.subnet.model_uri}")
    with progress("SFT, DPO (and GRPO)"):
        aligned = align_flow(
            extraction.subnet.model_uri, data, config.sft, config.dpo, workdir, config.grpo, pretrained.data_dir
        )
        print(f"aligned: {aligned.final_uri}")
    lineage = {
        "parent_sft": aligned.sft_uri,
        "parent_subnet": extraction.subnet.model_uri,
        "parent_supernet": pretrained.model_uri,
        "subnet": extraction.subnet.subnet,
        **({"family_member": member} if member else {}),
    }
    with progress("export, quantization and gate"):
        deployed = deploy_flow(
            aligned.final_uri, data, deploy, config.gate, config.sft.task_mix, lineage, workdir, pretrained.data_dir
        )
    return extraction, aligned, deployed


@flow(name="pipeline", flow_run_name=run_name("pipeline"), log_prints=True)
@guarded_flow
def pipeline(config: PipelineConfig = PipelineConfig(), workdir: str = "runs/pipeline") -> PipelineResult:  # noqa: B008
    """Train once: prepare the corpus, pre-train the elastic supernet, search the family under budgets,
    extract and distil the chosen sub-model, align it, export and quantize it, and promote it if it beats
    the champion; every model registered in MLflow."""
    workdir = checked_workdir(workdir)
    check_gguf_request("deploy.gguf", config.deploy.gguf)
    create_markdown_artifact(
        key="pipeline-config",
        markdown=f"### Pipeline configuration\nworkdir `{workdir}`; {ui_hint(workdir)}\n\n"
        f"```json\n{config.model_dump_json(indent=2)}\n```",
        description="The validated configuration of this run",
    )
    source = None
    if config.init_from:  # a pretrained MoE: its architecture, elastic space and tokenizer from here on
        source = init_source_task(config.init_from, workdir)
        config = adapt_config(config, source, workdir)
    data = retrain_data_task(config.data, config.pretrain, workdir)  # a retrain keeps its supernet's tokenizer
    total = STAGES + len(config.family)
    with stage(1, "data and elastic pre-training", total):
        if source and config.init_steps == 0:
            pretrained = PretrainedSupernet(model_uri=source, data_dir=prepare_data_task(data))
        else:
            pretrained = pretrain_flow(data, config.pretrain, workdir, parent=source)
        print(f"supernet: {pretrained.model_uri}")
    numbers = iter(range(2, STAGES + 1))
    extraction, aligned, deployed = deploy_member(
        config.search,
        config.deploy,
        pretrained,
        data,
        config,
        workdir,
        progress=lambda what: stage(next(numbers), what, total),
    )
    family = []
    for number, member in enumerate(config.family, start=STAGES + 1):
        with stage(number, f"family member {member.name}: search to gate", total):
            deploy = config.deploy.model_copy(update={"model_name": member.model_name()})
            parts = deploy_member(member.search(config.search), deploy, pretrained, data, config, workdir, member.name)
        family.append(
            FamilyMemberResult(name=member.name, extraction=parts[0], alignment=parts[1], deployment=parts[2])
        )
    result = PipelineResult(
        pretrain=pretrained, extraction=extraction, alignment=aligned, deployment=deployed, family=family
    )
    create_markdown_artifact(
        key="pipeline-summary",
        markdown="### What this run produced\n\n```\n" + "\n".join(result.summary(workdir)) + "\n```",
        description="The chosen sub-model, the candidate and the promotion decision",
    )
    return result
