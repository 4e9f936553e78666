"""The train-once claim, measured: sub-models cut from one elastic run vs the same shapes trained from scratch.

    .venv/bin/python benchmarks/train_once.py                 # tiny preset, CPU, about 6 minutes
    .venv/bin/python benchmarks/train_once.py --config small  # one GPU

Same data, same tokens. (a) the elastic supernet run; for the chosen sub-model (the preset's search budgets)
and three more family members (active-parameter budgets 60/75/90% of the supernet's): (b) that architecture
trained from scratch on the supernet's token count; (c) the extracted sub-model, as cut and after
distillation at the preset's fraction (6%) of (b)'s compute. Prints the table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from models.accounting import subnet_cost
from models.checkpoint import load_model
from models.extract import extract_subnet, subnet_config
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, SubnetSpec
from tasks.data import PreparedData, prepare_data
from tasks.extract import distill_subnet, rank_importance
from tasks.pipeline_config import PipelineConfig, load_pipeline_config, parse_overrides
from tasks.pretrain import PretrainConfig, evaluate_panel, run_pretrain, subnets_for_step
from tasks.search import run_search
from tasks.throughput import training_flops


def elastic_run_flops(config: PretrainConfig) -> float:
    """Training FLOPs of the elastic run: the sub-models its sampler drew at every step (replayed)."""
    model = ElasticMoE(config.model)  # importance is the identity during pre-training, as in the run
    tokens = config.tokens_per_step()
    return sum(
        training_flops(
            config.model,
            subnets_for_step(config, model, random.Random(config.seed * 1_000_003 + step)),
            config.seq_len,
            tokens,
        )
        for step in range(config.total_steps())
    )


def from_scratch(pipeline: PipelineConfig, spec: SubnetSpec, data: PreparedData, workdir: Path):
    """The same pre-training loop on the sub-model's architecture alone (policy `full`), same tokens."""
    arch = subnet_config(pipeline.pretrain.model, spec)
    depth = arch.n_layers
    pretrain = pipeline.pretrain.model_copy(
        update={
            "model": arch,
            "elastic": ElasticSpace(depths=(depth,), expert_counts=(arch.n_experts,), top_ks=(arch.top_k,)),
            "sampling": pipeline.pretrain.sampling.model_copy(update={"policy": "full"}),
        }
    )
    return run_pretrain(PretrainConfig.model_validate(pretrain.model_dump()), data, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    pipeline = load_pipeline_config(args.config, parse_overrides(args.set))
    data = prepare_data(pipeline.data)
    workdir = Path(tempfile.mkdtemp(prefix="train_once_"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    elastic = run_pretrain(pipeline.pretrain, data, workdir / "supernet")
    supernet = load_model(elastic.checkpoint_dir, device).eval()
    rank_importance(supernet, data, pipeline.extract, pipeline.pretrain.elastic, pipeline.search.seq_len)
    search, val = pipeline.search, data.split("val")

    def objective(spec: SubnetSpec) -> float:
        shape = (search.eval_batch_size, search.seq_len, search.eval_batches, device)
        return evaluate_panel(supernet, {"s": spec}, val, *shape)["s"]

    budgets = {"chosen (preset budgets)": search}
    for fraction in (0.6, 0.75, 0.9):
        budgets[f"active <= {fraction:.0%}"] = search.model_copy(
            update={"total_params_fraction": None, "active_params_fraction": fraction}
        )
    tokens = pipeline.pretrain.tokens_per_step() * pipeline.pretrain.total_steps()
    full = subnet_cost(supernet.config)
    rows = [
        ("(a) elastic supernet run", full.total_params, full.active_params, elastic_run_flops(pipeline.pretrain),
         elastic.val_loss["full"]),
    ]  # fmt: skip
    for label, budget in budgets.items():
        spec = run_search(
            budget, supernet.config, pipeline.pretrain.elastic, supernet.importance(), objective
        ).chosen.spec
        cost = subnet_cost(supernet.config, spec)
        scratch = from_scratch(pipeline, spec, data, workdir / f"scratch_{len(rows)}")
        scratch_flops = training_flops(subnet_config(supernet.config, spec), [None], pipeline.pretrain.seq_len, tokens)
        student = extract_subnet(supernet, spec)
        distilled = distill_subnet(student, supernet, data, pipeline.extract, tokens)
        name = f"{label}: {spec.describe()} layers {list(spec.layers)}"
        rows += [
            (f"{name}\n  (b) from scratch, same tokens", cost.total_params, cost.active_params, scratch_flops,
             scratch.val_loss["full"]),
            ("  (c) extracted, no distillation", cost.total_params, cost.active_params, 0.0,
             distilled.val_loss_before),
            (f"  (c) extracted + distilled ({distilled.compute_fraction:.1%} of b)", cost.total_params,
             cost.active_params, distilled.compute_fraction * scratch_flops, distilled.val_loss_after),
        ]  # fmt: skip

    print(f"\n{args.config}: {tokens:,} training tokens, validation loss in nats/token on the held-out split")
    print(f"{'model':<64}{'params':>12}{'active':>12}{'train TFLOP':>13}{'val loss':>10}")
    for name, total, active, flops, loss in rows:
        head, _, last = name.rpartition("\n")
        if head:
            print(head)
        print(f"{last:<64}{total:>12,}{active:>12,}{flops / 1e12:>13.3f}{loss:>10.4f}")


if __name__ == "__main__":
    main()
