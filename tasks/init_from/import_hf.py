"""Hugging Face import: a local transformers checkpoint of ERNIE 4.5 MoE (`Ernie4_5_MoeForCausalLM`) becomes a
`trainonce-supernet` version, so a pretrained MoE enters the pipeline where elastic pre-training would have
left one: search, extraction, distillation, alignment and deployment start from it.

Everything that can be wrong is checked before a weight is loaded: the architecture and its options
(`models.hf.config_from_hf`), every tensor's name and shape against the safetensors headers, the tokenizer and
the model's own chat format (`models.chat_format.chat_format_from_hf`), and the elastic space against the model.

Weights are read one decoder layer at a time from the memory-mapped files into the fp32 model, so host memory
peaks at the fp32 model plus the copy safetensors makes while writing it (2 x 4 bytes per parameter), not at
the several copies a whole-state-dict load makes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from models.config import MoEConfig
from models.hf import config_from_hf, copy_hf_tensors, from_checkpoint_layout, hf_expected_shapes, unfilled
from models.moe import ElasticMoE
from models.subnet import ElasticSpace

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
Headers = dict[str, tuple[Path, tuple[int, ...]]]  # tensor name -> (its safetensors file, its shape)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (sharded via model.safetensors.index.json, or one file)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights (pytorch_model.bin is not read: no pickle)")
    return files


def files_sha256(directory: Path) -> str:
    """Hash of the checkpoint's files (names and contents): the identity an imported supernet is tagged with."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def tensor_headers(directory: Path) -> Headers:
    """Each tensor's file and shape, read from the safetensors headers only."""
    headers = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                headers[name] = (path, tuple(handle.get_slice(name).get_shape()))
    return headers


def check_weights(directory: Path, hf_config: dict, headers: Headers) -> None:
    """Every tensor the architecture needs is there with its shape (`headers`: `tensor_headers(directory)`)."""
    expected = hf_expected_shapes(hf_config)
    meta = {name: torch.empty(shape, device="meta") for name, (_, shape) in headers.items()}
    found = {name: tuple(tensor.shape) for name, tensor in from_checkpoint_layout(meta).items()}
    missing = sorted(set(expected) - set(found))
    wrong = [
        f"{name}: {found[name]} in the files, {expected[name]} in config.json"
        for name in sorted(expected)
        if name in found and found[name] != expected[name]
    ]
    if missing or wrong:
        raise ValueError(f"{directory}: weights do not match config.json: missing {missing[:5]}, shapes {wrong[:5]}")


def load_hf_weights(directory: Path, hf_config: dict, headers: Headers) -> ElasticMoE:
    """Our fp32 model with the checkpoint's weights, read one decoder layer at a time (a layer's experts are
    stacked from their per-expert tensors, wherever the shards keep them; each shard opened once per layer)."""
    model = ElasticMoE(config_from_hf(hf_config))
    groups: dict[str, dict[Path, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, (path, _) in headers.items():
        match = _LAYER.match(name)
        groups[match.group(1) if match else "embeddings, norm, head"][path].append(name)
    filled: set[str] = set()
    for group in tqdm(groups.values(), desc="import-hf: layers", unit="layer"):
        tensors = {}
        for path, names in group.items():
            with safe_open(str(path), framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in names})
        filled |= copy_hf_tensors(model, from_checkpoint_layout(tensors))
    missing = unfilled(model, filled)
    if missing:
        raise ValueError(f"{directory}: the files lack {missing[:5]}")
    return model


def default_elastic_space(config: MoEConfig) -> ElasticSpace:
    """A sub-model family for an imported model: 1/2 to all of its layers, 1/4 to all of its experts per layer,
    top-k 1 up to its own."""
    depths = sorted({max(1, math.ceil(config.n_layers * f)) for f in (0.5, 2 / 3, 5 / 6, 1.0)})
    counts = sorted({max(config.top_k, round(config.n_experts * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    return ElasticSpace(depths=tuple(depths), expert_counts=tuple(counts), top_ks=tuple(range(1, config.top_k + 1)))
