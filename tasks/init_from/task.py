"""Starting the pipeline from a pretrained MoE (`init_from`): the source supernet, and the configuration the
later stages run with (its architecture, elastic space and tokenizer instead of the preset's)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from tokenizers import Tokenizer

from models.chat_format import chat_format_from_hf, chat_format_of
from models.checkpoint import load_config, save_model
from models.hf import config_from_hf
from models.subnet import ElasticSpace
from registry.models import RegisteredVersion, download_checkpoint, register_checkpoint
from registry.names import SUPERNET_MODEL
from registry.tracking import lineage_tags, stage_run, store_client
from tasks.data.corpus import check_tokenizer
from tasks.init_from.import_hf import (
    check_weights,
    default_elastic_space,
    files_sha256,
    load_hf_weights,
    tensor_headers,
)
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


def import_hf(
    directory: str | Path,
    workdir: str | Path,
    elastic: ElasticSpace | None = None,
    pretrain_tokens: int = 0,
    chat_template: Path | None = None,
) -> RegisteredVersion:
    """Register the checkpoint in `directory` as a new `trainonce-supernet` version (tags: source, files hash;
    extra: the elastic space its sub-models are searched in, its chat format, and `pretrain_tokens`: what the
    source was trained on, which sizes the distillation budget of sub-models extracted without continued
    pre-training)."""
    directory = Path(directory).resolve()
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (a transformers checkpoint folder is expected)")
    if pretrain_tokens < 0:
        raise ValueError(f"pretrain_tokens: must be >= 0, got {pretrain_tokens}")
    hf_config = json.loads(config_file.read_text())
    config = config_from_hf(hf_config)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"{directory}: no tokenizer.json (the fast tokenizer file is needed; a sentencepiece-only checkpoint "
            "gets one from `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`)"
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    chat_format = chat_format_from_hf(directory, tokenizer, chat_template)
    check_tokenizer(tokenizer, tokenizer_path, config.vocab_size, chat_format, "tokenizer")
    elastic = elastic or default_elastic_space(config)
    try:
        elastic.check_fits(config)
    except ValueError as error:
        raise ValueError(f"elastic: {error}") from error
    headers = tensor_headers(directory)
    check_weights(directory, hf_config, headers)

    digest = files_sha256(directory)
    model = load_hf_weights(directory, hf_config, headers)
    with stage_run(workdir, "import-hf") as logger:
        logger.log_params(
            {
                "source": str(directory),
                "files_sha256": digest,
                "model": config.model_dump(mode="json"),
                "pretrain_tokens": pretrain_tokens,
            }
        )
        checkpoint = save_model(model, Path(workdir) / "imports" / digest[:16] / "supernet")
        del model
        extra = {
            "elastic_space": elastic.model_dump(mode="json"),
            "pretrain_tokens": pretrain_tokens,
            "source": f"hf:{directory}",
            "chat_format": chat_format.model_dump(mode="json"),
        }
        tags = lineage_tags(
            "import-hf",
            source=f"hf:{directory}",
            files_sha256=digest,
            architecture=hf_config.get("architectures", ["?"])[0],
        )
        version = register_checkpoint(workdir, logger.run_id, SUPERNET_MODEL, checkpoint, tokenizer_path, extra, tags)
    return version
