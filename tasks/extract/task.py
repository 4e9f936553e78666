"""Extraction stage: cut the chosen sub-model out of the ranked supernet, distil it briefly from the supernet.

The supernet arrives ranked (tasks.search.importance), so "the n most important" sub-models keep what
matters. The chosen spec is extracted as a standalone model (`extract_subnet`: exact) and, optionally,
trained further with KL to the supernet's logits plus CE, for a compute budget expressed as a fraction of
what pre-training that architecture from scratch on the supernet's tokens would cost (default 6%, the
share ERNIE 5.1 reports).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefect import task

from models.checkpoint import load_model
from models.subnet import SubnetSpec
from registry.models import register_checkpoint
from registry.names import SUBNET_MODEL, SUPERNET_MODEL
from registry.tracking import lineage_tags, stage_run
from tasks.common.stage_results import ExtractedSubnet, SubnetAchieved, SubnetBudget
from tasks.data.corpus import PreparedData
from tasks.extract.config import ExtractConfig
from tasks.extract.extract import ExtractResult, run_extract


def describe_result(result: ExtractResult) -> dict[str, str]:
    """Registry tags of an extracted sub-model."""
    return {
        "subnet_spec": result.spec.model_dump_json(),
        "subnet": result.spec.describe(),
        "total_params": str(result.total_params),
        "active_params": str(result.active_params),
        "total_params_fraction": f"{result.total_fraction:.4f}",
        "active_params_fraction": f"{result.active_fraction:.4f}",
        "val_loss_before_distill": f"{result.distill.val_loss_before:.4f}",
        "val_loss_after_distill": f"{result.distill.val_loss_after:.4f}",
        "distill_steps": str(result.distill.steps),
        "distill_compute_fraction": f"{result.distill.compute_fraction:.4f}",
        "distill_val_perplexity": f"{math.exp(min(result.distill.val_loss_after, 50)):.2f}",
    }


@task(name="extract", retries=1, retry_delay_seconds=5)
def extract_task(
    config: ExtractConfig,
    ranked_supernet_dir: str,
    spec_json: str,
    data_dir: str,
    workdir: str,
    supernet_version: str,
    pretrain_tokens: int,
    limits: dict[str, float],
) -> ExtractedSubnet:
    """Extract and distil the chosen sub-model, then register it as a `trainonce-subnet` version."""
    data = PreparedData.load(data_dir)
    supernet = load_model(ranked_supernet_dir).eval()
    spec = SubnetSpec.model_validate_json(spec_json)
    with stage_run(workdir, "extract") as logger:
        logger.log_params({"extract": config.model_dump(mode="json"), "subnet_spec": spec_json})
        output = Path(workdir) / "extract" / Path(ranked_supernet_dir).parent.name / spec.describe().replace(" ", "_")
        result = run_extract(supernet, spec, data, config, pretrain_tokens, output)
        logger.log_metrics(
            {
                "val_loss_before_distill": result.distill.val_loss_before,
                "val_loss_after_distill": result.distill.val_loss_after,
                "distill_steps": result.distill.steps,
                "distill_compute_fraction": result.distill.compute_fraction,
                "total_params_fraction": result.total_fraction,
                "active_params_fraction": result.active_fraction,
            },
            step=0,
        )
        parents = {"parent_model": f"{SUPERNET_MODEL}/{supernet_version}", "parent_supernet_version": supernet_version}
        tags = {
            **lineage_tags("extract", data.fingerprint, **parents),
            "budgets": json.dumps(limits),
            **describe_result(result),
        }
        version = register_checkpoint(
            workdir,
            logger.run_id,
            SUBNET_MODEL,
            result.model_dir,
            data.tokenizer_path,
            {"subnet_spec": spec.model_dump(mode="json"), "chat_format": data.chat_format.model_dump(mode="json")},
            tags,
        )
    return ExtractedSubnet(
        model_uri=version.uri,
        version=version.version,
        model_dir=str(result.model_dir),
        subnet=spec.describe(),
        parent_model=tags["parent_model"],
        budget=SubnetBudget(
            **limits, distill_compute_fraction=config.distill_compute_fraction if config.distill else None
        ),
        achieved=SubnetAchieved(
            total_params=result.total_params,
            active_params=result.active_params,
            total_params_fraction=result.total_fraction,
            active_params_fraction=result.active_fraction,
            val_loss_before_distill=result.distill.val_loss_before,
            val_loss_after_distill=result.distill.val_loss_after,
            distill_steps=result.distill.steps,
            distill_compute_fraction=result.distill.compute_fraction,
        ),
    )
