"""Registered models: register a version with lineage tags, and resolve a name@alias or version to files."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array, Object, ParamSchema, ParamSpec, Property

from models.image_tokenizer import ImageTokenizer
from models.publish import staged_dir, staged_file
from models.sampling import SamplingParams
from registry.names import CHAT_MODEL, HF_MODEL
from registry.tracking import active_store, configure_tracking, store_client, tracking_uri, ui_base_url

_SCORER_CODE = Path(__file__).resolve().parent / "scorer_pyfunc.py"
_PIP_REQUIREMENTS = ["trainonce", "torch", "onnxruntime", "safetensors", "tokenizers", "pandas"]
_REF = re.compile(r"^(?:models:/)?(?P<name>[\w.-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+|latest))$")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _log_and_register(
    workdir: str | Path,
    run_id: str,
    name: str,
    artifact_name: str,
    code: Path,
    artifacts: dict[str, str],
    signature: ModelSignature,
    input_example: Any,
    tags: dict[str, Any],
) -> RegisteredVersion:
    """Log a pyfunc "model from code" (no pickle) on `run_id`; register it as a new version of `name`."""
    configure_tracking(workdir)
    with active_store(workdir), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=str(code),
            artifacts=artifacts,
            signature=signature,
            input_example=input_example,
            pip_requirements=_PIP_REQUIREMENTS,
            registered_model_name=name,
        )
    return _tagged(workdir, RegisteredVersion(name, str(info.registered_model_version), run_id), tags)


def _tagged(workdir: str | Path, version: RegisteredVersion, tags: dict[str, Any]) -> RegisteredVersion:
    client = store_client(workdir)
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, str(value))
    return version


def register_checkpoint(
    workdir: str | Path,
    run_id: str,
    name: str,
    checkpoint_dir: Path,
    tokenizer_path: Path,
    extra: dict[str, Any],
    tags: dict[str, Any],
) -> RegisteredVersion:
    """Log a trainonce checkpoint as an MLflow pyfunc model (weights, config, tokenizer, and `extra` as
    `extra.json`) on `run_id` and register it as a new version of `name` carrying `tags` (lineage, metrics).

    Its `predict` scores texts under the model or any of its sub-models (registry/scorer_pyfunc.py)."""
    extra_file = checkpoint_dir.parent / f"{checkpoint_dir.name}_extra.json"
    with staged_file(extra_file) as staged:  # a second registration of the same folder may be writing it too
        staged.write_text(json.dumps(extra, indent=2))
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text"), ColSpec("string", "subnet", required=False)]),
        outputs=Schema([ColSpec("double", "nll"), ColSpec("long", "tokens")]),
    )
    artifacts = {"checkpoint": str(checkpoint_dir), "tokenizer": str(tokenizer_path), "extra": str(extra_file)}
    example = pd.DataFrame({"text": ["To be, or not to be: that is the question."], "subnet": [""]})
    return _log_and_register(
        workdir, run_id, name, checkpoint_dir.name, _SCORER_CODE, artifacts, signature, example, tags
    )


# The sampling controls a pyfunc caller may pass as MLflow `params` (greedy by default, as the server).
PYFUNC_SAMPLING_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
)


def register_chat_package(
    workdir: str | Path,
    run_id: str,
    package_dir: Path,
    tags: dict[str, Any],
    pyfunc_code: Path,
    name: str = CHAT_MODEL,
) -> RegisteredVersion:
    """Register an exported chat package (ONNX + tokenizer + generation config) as a `trainonce-chat` version.

    `pyfunc_code` is the model-from-code file whose `predict` takes OpenAI-style chat messages and returns
    completions (serving.CHAT_PYFUNC_CODE: the serving layer owns it, the registry only logs it), so
    `mlflow models serve -m models:/trainonce-chat@champion` answers chat requests."""
    message = Object([Property("role", DataType.string), Property("content", DataType.string)])
    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec(Array(message), "messages"),
                ColSpec(DataType.long, "max_tokens", required=False),
                ColSpec(Array(DataType.string), "images", required=False),  # data URLs, for a model that reads images
            ]
        ),
        outputs=Schema(
            [
                ColSpec(DataType.string, "content"),
                ColSpec(DataType.string, "finish_reason"),
                ColSpec(DataType.long, "prompt_tokens"),
                ColSpec(DataType.long, "completion_tokens"),
                ColSpec(DataType.string, "b64_json", required=False),  # the drawing's PNG, with image_output
            ]
        ),
        params=ParamSchema(
            [
                *(
                    ParamSpec(
                        name,
                        "long" if name in ("top_k", "seed") else "double",
                        SamplingParams.model_fields[name].default,
                    )
                    for name in PYFUNC_SAMPLING_PARAMS
                ),
                ParamSpec("image_output", "boolean", False),  # the reply is a drawing (a model with images)
            ]
        ),
    )
    example = pd.DataFrame({"messages": [[{"role": "user", "content": "Copy: to be or not"}]], "max_tokens": [8]})
    return _log_and_register(
        workdir, run_id, name, "chat", pyfunc_code, {"package": str(package_dir)}, signature, example, tags
    )


def register_hf_model(workdir: str | Path, run_id: str, hf_dir: Path, tags: dict[str, Any]) -> RegisteredVersion:
    """Register a transformers directory (tasks/deploy/hugging_face.py) as an MLflow `transformers` model, a version of
    `trainonce-chat-hf`: `mlflow.transformers.load_model("models:/trainonce-chat-hf/N")` gives a text-generation
    pipeline, and the logged folder is what transformers, vLLM or SGLang load.

    Logged as a pipeline object built from the local folder (MLflow 3.17's path form fails on transformers 5's
    task registry) with explicit requirements (its inference would import torchvision); offline throughout. A model
    that reads and draws images has its codebook (`image_tokenizer.json`) logged on the same run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    generator = pipeline(
        "text-generation",
        model=AutoModelForCausalLM.from_pretrained(hf_dir),
        tokenizer=AutoTokenizer.from_pretrained(hf_dir),
    )
    configure_tracking(workdir)
    with active_store(workdir), mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model=generator,
            name="hf",
            pip_requirements=["transformers", "torch", "safetensors", "tokenizers"],
            registered_model_name=HF_MODEL,
        )
        codebook = hf_dir / ImageTokenizer.FILE_NAME
        if codebook.is_file():  # the flavor saves the pipeline's own files only: the codebook goes on the run
            mlflow.log_artifact(str(codebook))
    return _tagged(workdir, RegisteredVersion(HF_MODEL, str(info.registered_model_version), run_id), tags)


def version_link(ref: str) -> str:
    """A markdown link to a registered version (`models:/NAME/VERSION`) in the MLflow UI, for Prefect artifacts."""
    name, _, version = parse_model_ref(ref)
    return f"[{name}/{version}]({ui_base_url()}/#/models/{name}/versions/{version})"


def set_alias(workdir: str | Path, name: str, alias: str, version: str) -> None:
    """Point `name@alias` at `version` (one atomic update: the alias never points nowhere)."""
    store_client(workdir).set_registered_model_alias(name, alias, version)


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name@alias`, `name/3`, `name/latest` (optionally prefixed `models:/`) -> (name, alias, version)."""
    match = _REF.match(ref.strip())
    if not match:
        raise ValueError(f"model reference {ref!r}: expected NAME@ALIAS, NAME/VERSION or NAME/latest")
    return match["name"], match["alias"], match["version"]


def resolve_version(workdir: str | Path, ref: str) -> RegisteredVersion:
    """The registered version a reference names; a clear error if the name, alias or version is unknown."""
    configure_tracking(workdir)
    client = store_client(workdir)
    name, alias, version = parse_model_ref(ref)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise LookupError(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as error:
        raise LookupError(f"{ref}: {error.message}") from error
    return RegisteredVersion(name, str(mv.version), mv.run_id)


def download_model(workdir: str | Path, ref: str, destination: str | Path | None = None) -> Path:
    """Local folder of the MLflow model `ref` names; its `artifacts/` holds checkpoint and tokenizer."""
    version = resolve_version(workdir, ref)
    with active_store(workdir):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.uri, dst_path=str(destination) if destination else None
        )
    return Path(local)


def version_tags(workdir: str | Path, version: RegisteredVersion) -> dict[str, str]:
    client = store_client(workdir)
    return dict(client.get_model_version(version.name, version.version).tags)


def _artifact_dir(local: Path, key: str, ref: str) -> Path:
    """Where the pyfunc artifact `key` lies in a downloaded model (MLflow names it after the logged folder)."""
    artifacts = mlflow.models.Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    if key not in artifacts:
        raise LookupError(f"{ref} has no `{key}` artifact (is it the right kind of model?)")
    return local / artifacts[key]["path"]


def _is_downloaded(folder: Path) -> bool:
    return (folder / "MLmodel").is_file()


def _download_once(workdir: str | Path, ref: str, destination: Path) -> Path:
    """`download_model` into `destination` unless a copy is there already (for a cache keyed by version: a
    version's files never change). Staged and published whole, so processes sharing the cache neither see nor
    leave a half download, and one that loses the race uses the winner's copy."""
    if not _is_downloaded(destination):
        with staged_dir(destination, keep_existing=_is_downloaded) as staged:
            download_model(workdir, ref, staged)
    return destination


def download_chat_package(workdir: str | Path, ref: str, destination: str | Path | None = None) -> Path:
    """The chat package folder (model.onnx, tokenizer.json, generation_config.json) of a `trainonce-chat` ref,
    downloaded into a new temporary folder, or once into `destination` (a cache folder for one version: a copy
    already there is used)."""
    local = _download_once(workdir, ref, Path(destination)) if destination else download_model(workdir, ref)
    return _artifact_dir(local, "package", ref)


@dataclass(frozen=True)
class DownloadedCheckpoint:
    version: RegisteredVersion
    checkpoint_dir: Path  # model.safetensors + config.json
    tokenizer_path: Path
    extra: dict[str, Any]  # what was registered beside the weights (elastic space, subnet spec, ...)


def version_cache_dir(root: str | Path, workdir: str | Path, version: RegisteredVersion) -> Path:
    """Where one registered version's files are cached under `root`: `<store>/<name>/<version>`, the store a hash of
    its address, because `NAME/3` of the embedded store and `NAME/3` of a tracking server the same workdir is later
    pointed at are different models."""
    store = hashlib.sha256(tracking_uri(workdir).encode()).hexdigest()[:12]
    return Path(root) / store / version.name / version.version


def download_checkpoint(workdir: str | Path, ref: str) -> DownloadedCheckpoint:
    """A registered trainonce checkpoint as local files under `<workdir>/registry-cache` (`version_cache_dir`;
    downloaded once: a version's files never change), so stages can start from any registered model."""
    version = resolve_version(workdir, ref)
    cache = version_cache_dir(Path(workdir) / "registry-cache", workdir, version)
    destination = _download_once(workdir, version.uri, cache)
    extra_file = _artifact_dir(destination, "extra", ref)
    return DownloadedCheckpoint(
        version,
        _artifact_dir(destination, "checkpoint", ref),
        _artifact_dir(destination, "tokenizer", ref),
        json.loads(extra_file.read_text()),
    )
