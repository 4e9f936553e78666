"""Starting the pipeline from a pretrained MoE (`init_from`): the source supernet, and the configuration the
later stages run with (its architecture, elastic space and tokenizer instead of the preset's)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from models.chat_format import chat_format_of
from models.checkpoint import load_config
from models.subnet import ElasticSpace
from registry.models import SUPERNET_MODEL, download_checkpoint
from registry.tracking import store_client
from tasks.import_hf import files_sha256, import_hf
from tasks.pipeline_config import PipelineConfig


def resolve_init_source(init_from: str, workdir: str | Path) -> str:
    """The registered supernet `init_from` names; an `hf:<dir>` checkpoint is imported once (a version tagged
    with the same files hash is reused)."""
    if not init_from.startswith("hf:"):
        return download_checkpoint(workdir, init_from).version.uri
    directory = Path(init_from.removeprefix("hf:")).resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"init_from: {directory} is not a folder")
    digest = files_sha256(directory)
    for version in store_client(workdir).search_model_versions(f"name='{SUPERNET_MODEL}'"):
        if version.tags.get("files_sha256") == digest:
            return f"models:/{SUPERNET_MODEL}/{version.version}"
    return import_hf(directory, workdir).uri


@task(name="init-source", retries=1, retry_delay_seconds=5)
def init_source_task(init_from: str, workdir: str) -> str:
    """Never cached: importing registers a version, and a cached URI could name another store's version."""
    return resolve_init_source(init_from, workdir)


def adapt_config(config: PipelineConfig, source_ref: str, workdir: str | Path) -> PipelineConfig:
    """The pipeline configuration for a run starting from `source_ref`: its architecture, elastic space,
    tokenizer and chat format; `init_steps` of continued pre-training, never a warm start from another supernet."""
    source = download_checkpoint(workdir, source_ref)
    model = load_config(source.checkpoint_dir)
    elastic = ElasticSpace.model_validate(source.extra["elastic_space"])
    pretrain = config.pretrain.model_copy(
        update={
            "model": model,
            "elastic": elastic,
            "max_steps": max(config.init_steps, 1),
            "max_tokens": None,
            "warm_start": "never",
            "warm_start_steps": None,
        }
    )
    data = config.data.model_copy(
        update={
            "vocab_size": model.vocab_size,
            "tokenizer_file": str(source.tokenizer_path),
            "chat_format": chat_format_of(source.extra),
        }
    )
    return PipelineConfig.model_validate(
        {**config.model_dump(), "pretrain": pretrain.model_dump(), "data": data.model_dump()}
    )
