"""Extraction: cut the chosen sub-model out of the ranked supernet as a standalone model (models.extract) and distil
it from the supernet (tasks/extract/distill.py); what the extract task then registers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.accounting import subnet_cost
from models.checkpoint import save_model
from models.extract import extract_subnet
from models.moe import ElasticMoE
from models.subnet import SubnetSpec
from tasks.data.corpus import PreparedData
from tasks.extract.config import ExtractConfig
from tasks.extract.distill import DistillResult, distill_subnet, student_val_loss


@dataclass(frozen=True)
class ExtractResult:
    model_dir: Path
    spec: SubnetSpec
    total_params: int
    active_params: int
    total_fraction: float
    active_fraction: float
    distill: DistillResult


def run_extract(
    supernet: ElasticMoE,
    spec: SubnetSpec,
    data: PreparedData,
    config: ExtractConfig,
    pretrain_tokens: int,
    output_dir: str | Path,
) -> ExtractResult:
    """Extract `spec`, distil it if configured, save it (safetensors + config + spec JSON)."""
    student = extract_subnet(supernet, spec)
    if config.distill:
        distilled = distill_subnet(student, supernet, data, config, pretrain_tokens)
    else:
        loss = student_val_loss(student, data, config)
        distilled = DistillResult(0, 0.0, loss, loss)
    model_dir = save_model(student, Path(output_dir) / "subnet")
    (model_dir / "subnet_spec.json").write_text(spec.model_dump_json())
    full, cost = subnet_cost(supernet.config), subnet_cost(supernet.config, spec)
    return ExtractResult(
        model_dir,
        spec,
        cost.total_params,
        cost.active_params,
        cost.total_params / full.total_params,
        cost.active_params / full.active_params,
        distilled,
    )
