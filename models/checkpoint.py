"""Save and load models as `model.safetensors` + `config.json` (no pickle anywhere)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.config import MoEConfig
from models.moe import ElasticMoE
from models.publish import staged_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model(model: ElasticMoE, directory: str | Path, gathered: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights (importance orders included) and config; each file is replaced atomically, through a name
    private to this writer (two processes saving the same folder never write into one temporary file).

    `gathered` replaces `model.state_dict()` when the model holds only a shard of its weights (FSDP): the whole of
    them, gathered from every process."""
    directory = Path(directory)
    source = model.state_dict() if gathered is None else gathered
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in source.items()}
    with staged_file(directory / WEIGHTS_FILE) as weights:
        save_file(state, str(weights), metadata={"format": "pt", "library": "trainonce"})
    with staged_file(directory / CONFIG_FILE) as config:
        config.write_text(model.config.model_dump_json(indent=2))
    return directory


def load_config(directory: str | Path) -> MoEConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    return MoEConfig.model_validate(json.loads(path.read_text()))


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> ElasticMoE:
    """Load a saved model, checking every tensor's name and shape against its config first."""
    config = load_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
    state = load_file(str(weights), device=str(device))
    model = ElasticMoE(config).to(device)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    problems = [f"missing {n}" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected {n}" for n in sorted(set(found) - set(expected))]
    problems += [
        f"{n}: shape {found[n]} but the config needs {expected[n]}"
        for n in sorted(set(found) & set(expected))
        if found[n] != expected[n]
    ]
    if problems:
        raise ValueError(f"{weights} does not match {CONFIG_FILE}: " + "; ".join(problems[:8]))
    model.load_state_dict(state, strict=True)
    return model
