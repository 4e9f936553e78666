"""Fully sharded data parallelism (torch FSDP2, `fully_shard`) for the supernet, and its sharded checkpoints.

Under `pretrain.launch.sharding: fsdp2` each of N processes keeps 1/N of every decoder layer's weights, gradients
and AdamW moments; a layer's weights are gathered just before it runs and freed after (ZeRO-3), so a supernet that
does not fit one device trains on several. The loop calls `fully_shard` itself rather than through accelerate:
accelerate 1.16 has FSDP for accelerators only (on the CPU its state stays MULTI_CPU and wraps the model in DDP),
while torch shards over gloo on the CPU as well as over NCCL, so the same code runs in CI and on GPUs.

The units are the decoder layers, then the root (embedding, final norm and head, which `ElasticMoE.forward` reads
directly and so must stay in the root's group). A sub-model skips layers and experts, but every process runs the
same plan (drawn from seed and step) and each layer's experts are stacked tensors, so the processes' gathers and
gradient reductions line up without DDP's unused-parameter search.

Checkpoints are torch.distributed.checkpoint folders: every process writes its own shards (`__<rank>_0.distcp`),
and loading reshards them to whatever processes load them. torch's reader unpickles the folder's `.metadata` index
and its non-tensor entries without limits, so a checkpoint folder from elsewhere could run code on resume: they are
read here with the classes that index holds and nothing else, and with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.moe import ElasticMoE

PRECISION_DTYPES = {"no": None, "bf16": torch.bfloat16}


# FSDP2 warns when a sharded module returns a view, since an in-place op on it would skip a gradient hook. A decoder
# layer returns its key/value pair (views of one projection) for the KV cache, which training drops unmodified.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDecoderLayer\) returned a view tensor")


def shard_model(model: ElasticMoE, device: torch.device, precision: str) -> ElasticMoE:
    """Shard `model` in place over all processes of the default process group, each decoder layer its own unit.

    `precision` bf16 computes with bf16 copies of the gathered weights and reduces gradients in fp32, keeping
    fp32 weights and optimizer state (FSDP2's MixedPrecisionPolicy, as torchtitan does); `no` is fp32 throughout.
    """
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"pretrain.precision={precision!r} with fsdp2: allowed {sorted(PRECISION_DTYPES)}")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=PRECISION_DTYPES[precision], reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors (gathered from every process's shards). A collective: every
    process must call it; each gets the full tensors."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write model and optimizer state into `directory`, every process its own shards (a collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(state, checkpoint_id=directory, no_dist=not dist.is_initialized())  # one process: no group to join


# What torch writes into a checkpoint's `.metadata` (torch 2.13): its index classes, tensor sizes, dtypes, layouts.
_INDEX_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): Path,
    ("pathlib._local", "PosixPath"): Path,  # where Python 3.13 pickles it from
}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint index allowing only the globals above and dtypes (the Python docs' "restricting
    globals"): anything else, such as a callable a crafted file names, is refused before it runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_GLOBALS:
            return _INDEX_GLOBALS[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a checkpoint index may not name {module}.{name}")


class _IndexReader(dcp.FileSystemReader):
    """torch's folder reader, with the index read by `_IndexUnpickler` instead of plain pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as index:
            metadata = _IndexUnpickler(index).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """torch's load planner, reading the non-tensor entries (the optimizer's settings) with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Restore what `save_sharded` wrote, resharded to this run's processes (a collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(
        state,
        storage_reader=_IndexReader(directory),
        planner=_WeightsOnlyPlanner(),
        no_dist=not dist.is_initialized(),
    )
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
