"""Pre-training stage: the Prefect tasks that prepare a retrain's data and run pre-training, the registration of
the finished supernet (with its lineage and warm start), and the run in several processes.

The stage's other parts each have a module: its settings (tasks/pretrain/config.py), one elastic step
(tasks/pretrain/step.py), the validation panel (tasks/pretrain/validation_panel.py), the training loop
(tasks/pretrain/loop.py) and the entry point of each process (`accelerate launch -m tasks.pretrain.entry`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from tokenizers import Tokenizer

from models.chat_format import chat_format_of
from models.checkpoint import load_config
from models.image_tokenizer import ImageTokenizer
from registry.models import (
    DownloadedCheckpoint,
    RegisteredVersion,
    download_checkpoint,
    register_checkpoint,
    version_tags,
)
from registry.names import SUPERNET_MODEL
from registry.tracking import lineage_tags
from tasks.common.stage_results import PretrainedSupernet
from tasks.data.config import DataConfig
from tasks.data.corpus import PreparedData
from tasks.pretrain.config import PretrainConfig, PretrainResult
from tasks.pretrain.entry import pretrain_run, run_pretrain_launched
from tasks.pretrain.loop import run_pretrain
from tasks.pretrain.validation_panel import metric_key


def register_pretrained(
    result: PretrainResult,
    config: PretrainConfig,
    data: PreparedData,
    tracking_dir: str | Path,
    parent: DownloadedCheckpoint | None = None,
) -> RegisteredVersion:
    """Register the trained supernet as a new `trainonce-supernet` version with its lineage and metrics
    (and the supernet it was warm-started from, if any)."""
    if result.mlflow_run_id is None:
        raise ValueError("register_pretrained needs a run trained with tracking_dir set")
    tokens = config.tokens_per_step() * result.steps + (parent.extra.get("pretrain_tokens", 0) if parent else 0)
    lineage = (
        {"warm_started_from": parent.version.uri, "parent_supernet_version": parent.version.version} if parent else {}
    )
    tags = {
        **lineage_tags("pretrain", data.fingerprint, **lineage),
        "config_hash": result.config_hash,
        "steps": result.steps,
        **({"resumed_from_step": result.resumed_from} if result.resumed_from else {}),
        **{metric_key(label): f"{loss:.4f}" for label, loss in result.val_loss.items()},
    }
    return register_checkpoint(
        tracking_dir,
        result.mlflow_run_id,
        SUPERNET_MODEL,
        result.checkpoint_dir,
        data.tokenizer_path,
        {
            "elastic_space": config.elastic.model_dump(mode="json"),
            "pretrain_tokens": tokens,  # incl. the warm-start parent's: what this supernet has seen
            "chat_format": data.chat_format.model_dump(mode="json"),
            # the codebook of a supernet that reads images: a retrain keeps it with the tokenizer (retrain_data_config)
            **({"image_tokenizer": images.image_tokenizer.model_dump(mode="json")} if (images := data.images) else {}),
        },
        tags,
    )


def latest_supernet(workdir: str | Path) -> DownloadedCheckpoint | None:
    try:
        return download_checkpoint(workdir, f"{SUPERNET_MODEL}/latest")
    except LookupError:  # nothing registered yet
        return None


def same_vocabulary(tokenizer: Path, other: Path) -> bool:
    """Whether two tokenizer files map every token to the same id: the condition for weights trained with one to
    read text tokenized with the other."""
    return Tokenizer.from_file(str(tokenizer)).get_vocab() == Tokenizer.from_file(str(other)).get_vocab()


def warm_start_source(config: PretrainConfig, data: PreparedData, workdir: str | Path) -> DownloadedCheckpoint | None:
    """The latest registered supernet, when `warm_start` is on, it has this architecture and it was trained on
    other data than `data` (a retrain) tokenized as `data` is; else None (train from scratch). Data prepared with
    another tokenizer (a `data.tokenizer_file` of the user's) cannot continue its weights: the same ids would mean
    other tokens."""
    if config.warm_start == "never":
        return None
    parent = latest_supernet(workdir)
    if parent is None or version_tags(workdir, parent.version).get("data_fingerprint") == data.fingerprint:
        return None
    if load_config(parent.checkpoint_dir) != config.model:
        return None
    if not same_vocabulary(parent.tokenizer_path, data.tokenizer_path):
        print(f"not warm-starting from {parent.version.uri}: the data is tokenized with another vocabulary")
        return None
    return parent


def parent_supernet(parent_ref: str, data: PreparedData, workdir: str | Path) -> DownloadedCheckpoint:
    """The registered supernet `parent_ref` names, to continue; refused when `data` is tokenized otherwise."""
    parent = download_checkpoint(workdir, parent_ref)
    if not same_vocabulary(parent.tokenizer_path, data.tokenizer_path):
        raise ValueError(
            f"parent: {parent_ref} was trained with another tokenizer than the data's ({data.tokenizer_path}); "
            "prepare the data with the parent's tokenizer (the pretrain flow does when data.tokenizer_file is unset)"
        )
    return parent


def retrain_data_config(
    data: DataConfig, config: PretrainConfig, workdir: str | Path, parent_ref: str | None = None
) -> DataConfig:
    """With a parent to continue (`parent_ref`) or warm starts on (the latest supernet), prepare data with that
    supernet's tokenizer (and its image codebook, when it reads images): continuing weights needs the token ids they
    were trained on, and image codes that mean the same patches. Unchanged data then gets its old fingerprint back
    (it hashes the tokenizer and the codebook themselves), so every stage stays cached; new data gets a new one.
    A `data.tokenizer_file` of the user's is kept."""
    if data.tokenizer_file:
        return data
    if parent_ref is not None:
        parent = download_checkpoint(workdir, parent_ref)
    elif config.warm_start == "never":
        return data
    else:
        latest = latest_supernet(workdir)
        if latest is None or load_config(latest.checkpoint_dir) != config.model:
            return data
        parent = latest
    update: dict = {"tokenizer_file": str(parent.tokenizer_path), "chat_format": chat_format_of(parent.extra)}
    if data.images is not None and "image_tokenizer" in parent.extra:
        codebook = ImageTokenizer.model_validate(parent.extra["image_tokenizer"]).save(parent.checkpoint_dir.parent)
        update["images"] = data.images.model_copy(update={"codebook_file": str(codebook)})
    return data.model_copy(update=update)


def progress_bar(description: str) -> Callable[[int, int], None]:
    """A progress callback that draws a Prefect progress artifact (a bar in the UI) for the task run it is called
    in, created at the first call; outside a task run (`trainonce pretrain` calls the task's function) it does
    nothing."""
    artifact: list[UUID] = []

    def report(done: int, total: int) -> None:
        if TaskRunContext.get() is None:
            return
        percent = 100.0 * done / max(total, 1)
        if not artifact:
            artifact.append(create_progress_artifact(percent, description=description))
        else:
            update_progress_artifact(artifact[0], percent)

    return report


@task(name="retrain-data", retries=2, retry_delay_seconds=[2, 10])
def retrain_data_task(
    data: DataConfig, config: PretrainConfig, workdir: str, parent_ref: str | None = None
) -> DataConfig:
    """The data config this run prepares with (see retrain_data_config); reads the registry, so never cached."""
    return retrain_data_config(data, config, workdir, parent_ref)


@task(name="pretrain", retries=1, retry_delay_seconds=5)
def pretrain_task(
    config: PretrainConfig, data_dir: str, workdir: str, parent_ref: str | None = None
) -> PretrainedSupernet:
    """Elastic pre-training (warm-started on new data, see warm_start_source, or continued from `parent_ref`,
    a registered supernet such as an imported checkpoint), then registration; a retry resumes from the last
    checkpoint."""
    data = PreparedData.load(data_dir)
    parent = parent_supernet(parent_ref, data, workdir) if parent_ref else warm_start_source(config, data, workdir)
    if parent is not None and config.warm_start_steps is not None:
        config = config.model_copy(update={"max_steps": config.warm_start_steps, "max_tokens": None})
    init_label = parent.version.uri if parent else ""
    output_dir = Path(workdir) / "pretrain" / config.config_hash(data.fingerprint + init_label)[:16]
    init_from = parent.checkpoint_dir if parent else None
    if config.launch.in_process:
        bar = progress_bar(f"pre-training, {config.total_steps()} steps")
        result = run_pretrain(config, data, output_dir, pretrain_run(workdir), init_from, init_label, on_progress=bar)
    else:  # other processes: no bar
        result = run_pretrain_launched(config, data, output_dir, workdir, init_from, init_label)
    version = register_pretrained(result, config, data, workdir, parent)
    return PretrainedSupernet(
        model_uri=version.uri,
        data_dir=data_dir,
        version=version.version,
        run_id=result.mlflow_run_id,
        checkpoint_dir=str(result.checkpoint_dir),
        val_loss=result.val_loss,
        tokens_per_second=result.tokens_per_second,
        mfu=result.mfu,
        warm_started_from=init_label or None,
        resumed_from_step=result.resumed_from,
        image_val_loss=result.image_val_loss,
        modality_routing=result.modality_routing,
    )
