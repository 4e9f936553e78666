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

from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy, Inputs
from prefect.client.schemas.objects import State, TaskRun

from flows.run_guard import guarded_flow, run_name
from models.subnet import ElasticSpace
from registry.models import download_checkpoint, resolve_version, version_link
from registry.names import SUBNET_MODEL, SUPERNET_MODEL
from registry.promotion import GateRules
from registry.tracking import check_artifact_store, run_link, tracking_uri
from tasks.align.config import DPOConfig, GRPOConfig, SFTConfig
from tasks.align.task import dpo_task, grpo_task, sft_task
from tasks.common.stage_results import AlignedModels, DeploymentResult, ExtractionResult, Links, PretrainedSupernet
from tasks.data.config import DataConfig, TaskMixConfig
from tasks.data.corpus import source_digest
from tasks.data.task import prepare_data_task
from tasks.deploy.config import DeployConfig
from tasks.deploy.llama_cpp import check_gguf_request
from tasks.deploy.task import export_gguf_task, export_hf_task, export_task, gate_task
from tasks.extract.config import ExtractConfig
from tasks.extract.task import extract_task
from tasks.pipeline_config import PipelineConfig
from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.task import pretrain_task, retrain_data_task
from tasks.search.config import ImportanceConfig, SearchConfig
from tasks.search.task import search_task

DEFAULTS = PipelineConfig()  # the tiny preset: what a run with no parameters does
P = ParamSpec("P")
R = TypeVar("R")


def cached(
    task: Task[P, R],
    workdir: str,
    key_parts: Callable[[dict[str, Any]], list[str]] | None = None,
    not_inputs: tuple[str, ...] = (),
) -> Task[P, R]:
    """`task` caching on its inputs, its source and the MLflow store it registers in (the same workdir pointed at
    a tracking server must not reuse results naming versions of the embedded store), with JSON results persisted
    in the workdir (no pickle). `key_parts(inputs)` adds to the key what the inputs only name (the content of a
    user's file); `not_inputs` are inputs keyed by `key_parts` instead of whole (a config, by its identity)."""
    store = tracking_uri(workdir)

    def key(_context: object, inputs: dict[str, Any]) -> str:
        return "\n".join([store, *(key_parts(inputs) if key_parts else [])])

    inputs = Inputs(exclude=list(not_inputs))
    return task.with_options(
        cache_policy=inputs + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=key),
        persist_result=True,
        result_storage=Path(workdir) / ".prefect-results",
        result_serializer="json",
    )


def user_files(inputs: dict[str, Any]) -> list[str]:
    """An alignment step's key parts: the digests of the user's JSONL files its config names (`extra_jsonl`), so
    that an edited file is trained on, not answered from the cache."""
    names = [getattr(value, "extra_jsonl", None) for value in inputs.values()]
    return [source_digest([Path(name)]) for name in names if name]


def run_identity(inputs: dict[str, Any]) -> list[str]:
    """The pretrain task's key part: its config's run identity, which leaves out how the run is launched (N
    processes train what one does), so launching a finished run on more processes reuses it."""
    return [inputs["config"].config_hash("")]


def checked_workdir(workdir: str) -> str:
    """The absolute workdir, once its MLflow store and artifact store (a bucket behind a tracking server, S3)
    answer: a missing bucket or rejected credentials stop the flow here, before any compute."""
    workdir = str(Path(workdir).resolve())
    check_artifact_store(workdir)
    return workdir


def checked_model_ref(parameter: str, workdir: str, ref: str) -> None:
    """Stop the flow before any compute when the model reference in `parameter` is malformed or names nothing
    registered (for a reference the flow only passes on: pre-training's `parent`)."""
    try:
        resolve_version(workdir, ref)
    except (ValueError, LookupError) as error:
        raise ValueError(f"{parameter}: {error}") from error


def stage_data(data: DataConfig, data_dir: str | None) -> str:
    """The prepared data folder a stage reads: `data_dir` when given (the pipeline passes the one pre-training read,
    so every stage of a run reads the same documents even if the source changes during the run), else `data`
    prepared, or reused when its source is unchanged."""
    if data_dir is None:
        return prepare_data_task(data)
    if not (Path(data_dir) / "meta.json").is_file():
        raise ValueError(f"data_dir: {data_dir} is not a prepared data folder (it has no meta.json)")
    return data_dir


def _store_fault(_task: Task, _run: TaskRun, state: State) -> bool:
    """Retry a resolution that failed in the store (a timeout, a 5xx), not one whose reference is wrong: no retry
    fixes a typo."""
    try:
        state.result()
    except ValueError:  # resolve_model_task's own: malformed, or names nothing registered
        return False
    except Exception:
        return True
    return True


@task(name="resolve-model", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_store_fault)
def resolve_model_task(parameter: str, workdir: str, ref: str) -> dict[str, Any]:
    """The registered model `ref` (the flow's `parameter`) names, downloaded once into the workdir. A reference that
    is malformed or names nothing registered fails at once, naming the parameter; the flows resolve it first, before
    any data is prepared. Never cached: `NAME@ALIAS` and `NAME/latest` move, and the download itself is skipped when
    the version's files are already there."""
    try:
        downloaded = download_checkpoint(workdir, ref)
    except (ValueError, LookupError) as error:
        raise ValueError(f"{parameter}: {error}") from error
    return {
        "version": downloaded.version.version,
        "uri": downloaded.version.uri,
        "checkpoint_dir": str(downloaded.checkpoint_dir),
        "extra": downloaded.extra,
    }


class MlflowLinks(Links):
    """Registered models and runs as links to the MLflow UI, for Prefect artifacts."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def model(self, ref: str) -> str:
        return version_link(ref)

    def run(self, run_id: str) -> str:
        return run_link(self.workdir, run_id)


class Summarised(Protocol):
    """A stage result (tasks/common/stage_results.py)."""

    def summary(self, links: Links = ...) -> list[str]: ...


def report(result: Summarised, key: str, description: str, workdir: str) -> None:
    """A stage result's summary in the flow's log, and as a Prefect markdown artifact with its registered models
    and runs linked to the MLflow UI (the headline, then its details: a table, reasons)."""
    headline, *details = result.summary(MlflowLinks(workdir))
    create_markdown_artifact(key=key, markdown="\n".join([headline, "", *details]), description=description)
    print("\n".join(result.summary()))


@flow(name="pretrain", flow_run_name=run_name("pretrain"), log_prints=True)
@guarded_flow
def pretrain_flow(
    data: DataConfig = DEFAULTS.data,
    pretrain: PretrainConfig = DEFAULTS.pretrain,
    workdir: str = "runs/pipeline",
    parent: str | None = None,
) -> PretrainedSupernet:
    """Prepare the corpus and pre-train the elastic supernet (warm-started from the latest supernet when the
    data changed, or continued from `parent`, a registered supernet); registers a `trainonce-supernet` version."""
    workdir = checked_workdir(workdir)
    if parent is not None:
        checked_model_ref("parent", workdir, parent)
    data_dir = prepare_data_task(retrain_data_task(data, pretrain, workdir, parent))
    pretrained = cached(pretrain_task, workdir, run_identity, ("config",))(pretrain, data_dir, workdir, parent)
    report(pretrained, "pretrain-summary", "Elastic pre-training: validation loss of each panel sub-model", workdir)
    return pretrained


@flow(name="extract", flow_run_name=run_name("extract"), log_prints=True)
@guarded_flow
def extract_flow(
    supernet: str = f"{SUPERNET_MODEL}/latest",
    data: DataConfig = DEFAULTS.data,
    importance: ImportanceConfig = DEFAULTS.importance,
    search: SearchConfig = DEFAULTS.search,
    extract: ExtractConfig = DEFAULTS.extract,
    workdir: str = "runs/pipeline",
    data_dir: str | None = None,
) -> ExtractionResult:
    """Rank the registered supernet's experts and layers, search its family under budgets, extract and distil the
    chosen sub-model; registers a `trainonce-subnet` version. `data_dir`: a prepared data folder to read instead of
    preparing `data` (what the pipeline passes: the one pre-training read)."""
    workdir = checked_workdir(workdir)
    source = resolve_model_task("supernet", workdir, supernet)
    data_dir = stage_data(data, data_dir)
    if "pretrain_tokens" not in source["extra"]:
        raise ValueError(f"{supernet}: registered before pre-training tokens were recorded; re-run pretrain")
    elastic = ElasticSpace.model_validate(source["extra"]["elastic_space"])
    chosen = cached(search_task, workdir)(search, importance, elastic, source["checkpoint_dir"], data_dir, workdir)
    create_table_artifact(key="search-candidates", table=chosen.candidates, description="Every evaluated sub-model")
    report(chosen, "search-choice", "Chosen sub-model", workdir)
    extracted = cached(extract_task, workdir)(
        extract,
        chosen.ranked_supernet_dir,
        chosen.spec_json,
        data_dir,
        workdir,
        source["version"],
        source["extra"]["pretrain_tokens"],
        chosen.limits,
    )
    report(extracted, "extraction", "The extracted sub-model and what distillation recovered", workdir)
    return ExtractionResult(search=chosen, subnet=extracted)


@flow(name="align", flow_run_name=run_name("align"), log_prints=True)
@guarded_flow
def align_flow(
    subnet: str = "trainonce-subnet/latest",
    data: DataConfig = DEFAULTS.data,
    sft: SFTConfig = DEFAULTS.sft,
    dpo: DPOConfig = DEFAULTS.dpo,
    workdir: str = "runs/pipeline",
    grpo: GRPOConfig = DEFAULTS.grpo,
    data_dir: str | None = None,
) -> AlignedModels:
    """SFT then DPO (then GRPO, when enabled) of a registered sub-model; registers each in `trainonce-chat-torch`.
    Each step is its own cached task, so a step that fails and is retried, or a re-run that changes one step's
    config, redoes that step and the ones after it, never the ones before. `data_dir`: as for `extract`."""
    workdir = checked_workdir(workdir)
    source = resolve_model_task("subnet", workdir, subnet)
    data_dir = stage_data(data, data_dir)
    version, task_mix = source["version"], sft.task_mix
    sft_step = cached(sft_task, workdir, user_files)(sft, source["checkpoint_dir"], data_dir, workdir, version)
    dpo_step = cached(dpo_task, workdir, user_files)(dpo, task_mix, sft_step, data_dir, workdir, version)
    grpo_step = (
        cached(grpo_task, workdir)(grpo, task_mix, dpo_step, data_dir, workdir, version) if grpo.enabled else None
    )
    aligned = AlignedModels.of(f"{SUBNET_MODEL}/{version}", sft_step, dpo_step, grpo_step)
    report(aligned, "alignment", "Held-out exact match per task", workdir)
    return aligned


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
    data_dir: str | None = None,
) -> DeploymentResult:
    """Export and quantize a registered aligned model, register the candidate in `trainonce-chat`, and promote
    it to `champion` if it passes the gate against the current champion. `data_dir`: as for `extract`."""
    workdir = checked_workdir(workdir)
    check_gguf_request("deploy.gguf", deploy.gguf)
    source = resolve_model_task("aligned", workdir, aligned)
    data_dir = stage_data(data, data_dir)
    lineage = {"parent_model": source["uri"], **(lineage or {})}
    exported = cached(export_task, workdir)(deploy, task_mix, source["checkpoint_dir"], data_dir, workdir, lineage)
    report(exported, "export", "ONNX variants measured with onnxruntime on the held-out evaluation", workdir)
    hugging_face = (
        cached(export_hf_task, workdir)(source["checkpoint_dir"], data_dir, workdir, lineage)
        if deploy.hugging_face
        else None
    )
    if hugging_face:
        print("\n".join(hugging_face.summary()))
    gguf = (
        cached(export_gguf_task, workdir)(
            source["checkpoint_dir"],
            data_dir,
            workdir,
            lineage,
            deploy.gguf,
            hugging_face.directory if hugging_face and Path(hugging_face.directory, "config.json").is_file() else None,
        )
        if deploy.gguf
        else None
    )
    if gguf:
        print("\n".join(gguf.summary()))
    gated = cached(gate_task, workdir)(
        gate, deploy.evaluation, task_mix, exported.version, data_dir, workdir, deploy.model_name
    )
    report(gated, "promotion", "Gate decision: candidate vs champion on the same held-out evaluation", workdir)
    return DeploymentResult(export=exported, hugging_face=hugging_face, gate=gated, gguf=gguf)
