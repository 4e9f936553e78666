"""Stage flows, each usable on its own (from the Prefect UI, `prefect deployment run`, or Python) and as a
subflow of `pipeline`. Parameters are the stages' pydantic configs plus the registered model a stage starts
from (`NAME@ALIAS`, `NAME/VERSION`, `NAME/latest` or `models:/...`), so e.g. re-aligning and redeploying an
existing sub-model is one run of `align` then `deploy`.

Tasks cache on their inputs (configs, data folder = data fingerprint, upstream model URIs) with results
persisted under `<workdir>/.prefect-results`: re-running the same pipeline skips finished stages, a crashed
run resumes after its last finished stage, and changing one stage's config re-runs that stage and, because
its outputs (new registered versions) change, everything after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from flows.run_guard import guarded_flow, run_name
from models.subnet import ElasticSpace
from registry.models import CHAT_MODEL, SUPERNET_MODEL, download_checkpoint, version_link
from registry.promotion import GateRules
from registry.tracking import check_artifact_store, run_link, tracking_uri
from tasks.align import DPOConfig, SFTConfig, align_task
from tasks.align_data import TaskMixConfig
from tasks.data import DataConfig, prepare_data_task
from tasks.export import DeployConfig, export_task
from tasks.export_hf import export_hf_task
from tasks.extract import ExtractConfig, extract_task
from tasks.gate import gate_task
from tasks.importance_calibration import ImportanceConfig
from tasks.pipeline_config import PipelineConfig
from tasks.pretrain import pretrain_task, retrain_data_task
from tasks.pretrain_config import PretrainConfig
from tasks.search import SearchConfig, search_task

DEFAULTS = PipelineConfig()  # the tiny preset: what a run with no parameters does


def cached(task: Task, workdir: str) -> Task:
    """`task` caching on its inputs, its source and the MLflow store it registers in (the same workdir pointed at
    a tracking server must not reuse results naming versions of the embedded store), with JSON results persisted
    in the workdir (no pickle)."""
    store = tracking_uri(workdir)
    return task.with_options(
        cache_policy=INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda _context, _parameters: store),
        persist_result=True,
        result_storage=Path(workdir) / ".prefect-results",
        result_serializer="json",
    )


def checked_workdir(workdir: str) -> str:
    """The absolute workdir, once its MLflow store and artifact store (a bucket behind a tracking server, S3)
    answer: a missing bucket or rejected credentials stop the flow here, before any compute."""
    workdir = str(Path(workdir).resolve())
    check_artifact_store(workdir)
    return workdir


@task(name="resolve-model", retries=2, retry_delay_seconds=[2, 10])
def resolve_model_task(workdir: str, ref: str) -> dict[str, Any]:
    """The registered model `ref` names, downloaded once into the workdir. Never cached: `NAME@ALIAS` and
    `NAME/latest` move, and the download itself is skipped when the version's files are already there."""
    downloaded = download_checkpoint(workdir, ref)
    return {"version": downloaded.version.version, "uri": downloaded.version.uri,
            "checkpoint_dir": str(downloaded.checkpoint_dir), "extra": downloaded.extra}  # fmt: skip


@flow(name="pretrain", flow_run_name=run_name("pretrain"), log_prints=True)
@guarded_flow
def pretrain_flow(
    data: DataConfig = DEFAULTS.data,
    pretrain: PretrainConfig = DEFAULTS.pretrain,
    workdir: str = "runs/pipeline",
    parent: str | None = None,
) -> dict:
    """Prepare the corpus and pre-train the elastic supernet (warm-started from the latest supernet when the
    data changed, or continued from `parent`, a registered supernet); registers a `trainonce-supernet` version."""
    workdir = checked_workdir(workdir)
    data_dir = prepare_data_task(retrain_data_task(data, pretrain, workdir))
    pretrained = cached(pretrain_task, workdir)(pretrain, data_dir, workdir, parent)
    lines = [f"| {label} | {loss:.4f} |" for label, loss in pretrained["val_loss"].items()]
    create_markdown_artifact(
        key="pretrain-summary",
        markdown="\n".join(
            [f"### Supernet {version_link(pretrained['model_uri'])}",
             f"MLflow {run_link(workdir, pretrained['run_id'])}, {pretrained['tokens_per_second']:,.0f} tokens/s, "
             f"MFU {pretrained['mfu']:.1%}", "", "| sub-model | validation loss |", "|---|---|", *lines]
        ),
        description="Elastic pre-training: validation loss of each panel sub-model",
    )  # fmt: skip
    start = (
        f"warm-started from {pretrained['warm_started_from']}" if pretrained["warm_started_from"] else "from scratch"
    )
    if pretrained.get("resumed_from_step"):  # absent from results cached before it was recorded
        start += f", resumed from its checkpoint at step {pretrained['resumed_from_step']}"
    print(f"registered {pretrained['model_uri']} ({start}); validation losses {pretrained['val_loss']}")
    return {**pretrained, "data_dir": data_dir}


@flow(name="extract", flow_run_name=run_name("extract"), log_prints=True)
@guarded_flow
def extract_flow(
    supernet: str = f"{SUPERNET_MODEL}/latest",
    data: DataConfig = DEFAULTS.data,
    importance: ImportanceConfig = DEFAULTS.importance,
    search: SearchConfig = DEFAULTS.search,
    extract: ExtractConfig = DEFAULTS.extract,
    workdir: str = "runs/pipeline",
) -> dict:
    """Rank the registered supernet's experts and layers, search its family under budgets, extract and distil the
    chosen sub-model;
    registers a `trainonce-subnet` version."""
    workdir = checked_workdir(workdir)
    data_dir = prepare_data_task(data)
    source = resolve_model_task(workdir, supernet)
    if "pretrain_tokens" not in source["extra"]:
        raise ValueError(f"{supernet}: registered before pre-training tokens were recorded; re-run pretrain")
    elastic = ElasticSpace.model_validate(source["extra"]["elastic_space"])
    chosen = cached(search_task, workdir)(search, importance, elastic, source["checkpoint_dir"], data_dir, workdir)
    create_table_artifact(key="search-candidates", table=chosen["candidates"], description="Every evaluated sub-model")
    create_markdown_artifact(key="search-choice", markdown=chosen["choice"], description="Chosen sub-model")
    extracted = cached(extract_task, workdir)(
        extract, chosen["ranked_supernet_dir"], chosen["spec_json"], data_dir, workdir, source["version"],
        source["extra"]["pretrain_tokens"], chosen["limits"],
    )  # fmt: skip
    summary = (
        f"### {version_link(extracted['model_uri'])}: {extracted['subnet']} from {version_link(source['uri'])}\n"
        f"{extracted['total_params']:,} parameters ({extracted['total_fraction']:.1%}), "
        f"{extracted['active_params']:,} active ({extracted['active_fraction']:.1%}); validation loss "
        f"{extracted['val_loss_before']:.4f} extracted -> {extracted['val_loss_after']:.4f} after "
        f"{extracted['distill_steps']} distillation steps ({extracted['distill_compute_fraction']:.1%} of "
        f"from-scratch compute); search {run_link(workdir, chosen['run_id'])}"
    )
    create_markdown_artifact(
        key="extraction",
        markdown=summary,
        description="The extracted sub-model and what distillation recovered",
    )
    print(
        f"registered {extracted['model_uri']} ({extracted['subnet']}): {extracted['total_fraction']:.1%} of the "
        f"parameters, {extracted['active_fraction']:.1%} active; validation loss {extracted['val_loss_before']:.4f} "
        f"-> {extracted['val_loss_after']:.4f} after {extracted['distill_steps']} distillation steps "
        f"({extracted['distill_compute_fraction']:.1%} of from-scratch compute)"
    )
    return {**extracted, "search": chosen, "supernet_uri": source["uri"]}


@flow(name="align", flow_run_name=run_name("align"), log_prints=True)
@guarded_flow
def align_flow(
    subnet: str = "trainonce-subnet/latest",
    data: DataConfig = DEFAULTS.data,
    sft: SFTConfig = DEFAULTS.sft,
    dpo: DPOConfig = DEFAULTS.dpo,
    workdir: str = "runs/pipeline",
) -> dict:
    """SFT then DPO of a registered sub-model; registers both in `trainonce-chat-torch`."""
    workdir = checked_workdir(workdir)
    data_dir = prepare_data_task(data)
    source = resolve_model_task(workdir, subnet)
    aligned = cached(align_task, workdir)(sft, dpo, source["checkpoint_dir"], data_dir, workdir, source["version"])
    rows = [
        f"| {task} | {aligned['accuracy']['base'][task]:.3f} | {aligned['accuracy']['sft'][task]:.3f} | "
        f"{aligned['accuracy']['dpo'][task]:.3f} |"
        for task in aligned["accuracy"]["base"]
    ]
    create_markdown_artifact(
        key="alignment",
        markdown="\n".join(
            [f"### {version_link(aligned['sft_uri'])} (SFT), {version_link(aligned['dpo_uri'])} (DPO) from "
             f"{version_link(source['uri'])}",
             f"held-out DPO reward accuracy {aligned['reward_accuracy']:.3f}; pairs {aligned['pairs']}", "",
             "| task | base | SFT | DPO |", "|---|---|---|---|", *rows]
        ),
        description="Held-out exact match per task",
    )  # fmt: skip
    print(f"aligned: SFT {aligned['sft_uri']}, DPO {aligned['dpo_uri']}; accuracy {aligned['accuracy']}")
    return {**aligned, "subnet_uri": source["uri"]}


@flow(name="deploy", flow_run_name=run_name("deploy"), log_prints=True)
@guarded_flow
def deploy_flow(
    aligned: str = "trainonce-chat-torch/latest",
    data: DataConfig = DEFAULTS.data,
    deploy: DeployConfig = DEFAULTS.deploy,
    gate: GateRules = DEFAULTS.gate,
    task_mix: TaskMixConfig = DEFAULTS.sft.task_mix,
    lineage: dict[str, str] | None = None,
    workdir: str = "runs/pipeline",
) -> dict:
    """Export and quantize a registered aligned model, register the candidate in `trainonce-chat`, and promote
    it to `champion` if it passes the gate against the current champion."""
    workdir = checked_workdir(workdir)
    data_dir = prepare_data_task(data)
    source = resolve_model_task(workdir, aligned)
    lineage = {"parent_model": source["uri"], **(lineage or {})}
    exported = cached(export_task, workdir)(deploy, task_mix, source["checkpoint_dir"], data_dir, workdir, lineage)
    parity = exported["parity"]
    create_markdown_artifact(
        key="export",
        markdown="\n".join([f"### {version_link(exported['model_uri'])} (alias candidate): {exported['candidate']}",
                            f"onnxruntime fp32 vs PyTorch: max abs logit diff {parity['max_abs_logit_diff']:.2e}, "
                            f"same greedy tokens: {parity['greedy_tokens_equal']}", "", exported["table"]]),
        description="ONNX variants measured with onnxruntime on the held-out evaluation",
    )  # fmt: skip
    print(f"exported {exported['model_uri']} ({exported['candidate']}) as candidate")
    hugging_face = (
        cached(export_hf_task, workdir)(source["checkpoint_dir"], data_dir, workdir, lineage)
        if deploy.hugging_face
        else None
    )
    if hugging_face:
        print(f"registered {hugging_face['model_uri']}, a transformers directory of {source['uri']}")
    gated = cached(gate_task, workdir)(gate, deploy.evaluation, task_mix, exported["version"], data_dir, workdir)
    verdict = "promoted" if gated["promoted"] else "not promoted"
    candidate_link = version_link(f"{CHAT_MODEL}/{gated['candidate_version']}")
    champion_link = version_link(f"{CHAT_MODEL}/{gated['champion']}") if gated["champion"] else "none"
    create_markdown_artifact(
        key="promotion",
        markdown="\n".join(
            [f"### {candidate_link}: {verdict}",
             f"champion now: {champion_link} (before: {gated['previous_champion'] or 'none'})", "",
             *[f"- {reason}" for reason in gated["reasons"]]]
        ),
        description="Gate decision: candidate vs champion on the same held-out evaluation",
    )  # fmt: skip
    print(f"gate: {verdict}; {CHAT_MODEL}@champion = version {gated['champion']}")
    return {"export": exported, "gate": gated, "hugging_face": hugging_face}
