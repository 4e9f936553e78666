"""Registered models: register a version with lineage tags, and resolve a name@alias or version to files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from registry.tracking import active_store, configure_tracking, store_client

SUPERNET_MODEL = "trainonce-supernet"
SUBNET_MODEL = "trainonce-subnet"
CHAT_TORCH_MODEL = "trainonce-chat-torch"  # aligned PyTorch checkpoints (SFT, DPO); the ONNX deployable comes later
_SCORER_CODE = Path(__file__).resolve().parent / "scorer_pyfunc.py"
_REF = re.compile(r"^(?:models:/)?(?P<name>[\w.-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+|latest))$")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


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
    configure_tracking(workdir)
    extra_file = checkpoint_dir.parent / f"{checkpoint_dir.name}_extra.json"
    extra_file.write_text(json.dumps(extra, indent=2))
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text"), ColSpec("string", "subnet", required=False)]),
        outputs=Schema([ColSpec("double", "nll"), ColSpec("long", "tokens")]),
    )
    with active_store(workdir), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=checkpoint_dir.name,
            python_model=str(_SCORER_CODE),
            artifacts={"checkpoint": str(checkpoint_dir), "tokenizer": str(tokenizer_path), "extra": str(extra_file)},
            signature=signature,
            input_example=pd.DataFrame({"text": ["To be, or not to be: that is the question."], "subnet": [""]}),
            pip_requirements=["trainonce", "torch", "safetensors", "tokenizers", "pandas"],
            registered_model_name=name,
        )
    client = store_client(workdir)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return RegisteredVersion(name, version, run_id)


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
