"""The train-once claim, measured: a family cut from one elastic run vs its members trained alone.

    .venv/bin/python benchmarks/train_once.py --config claim --recipe nested_delayed --seeds 0 1 2  # CPU, 2 at once
    .venv/bin/python benchmarks/train_once.py --config small --recipe nested_delayed --seeds 0      # one GPU
    .venv/bin/python benchmarks/train_once.py --config claim --report --results docs/claim-results  # stored runs
    .venv/bin/python benchmarks/train_once.py --config claim --recipe nested_delayed_kd_anneal+distill_lr_low \
        --tune-lr --seeds 0 1 2   # every arm at its own best peak learning rate (benchmarks/lr_grid.py)

Rows, every model trained on the same number of tokens of the same data, every figure the validation loss
(nats/token) on the same 65,536 held-out tokens:
  (a) the elastic run of the recipe: its full model;
  (f) the full model trained alone (is the elastic run's full model as good?);
  for each of 4 members picked by the search on (a) (ERNIE 5.1's cut: <= 34% of the parameters and <= 50%
  active; and <= 60%, 75%, 90% of the active parameters):
  (b) the member's architecture trained alone (its twin);
  (c) the member extracted from (a), as cut and after distillation from (a) at extract.distill_compute_fraction
      (6%) of (b)'s compute;
  (m) Minitron: the same architecture pruned from (f) by measured importance, distilled from (f) with the same
      budget.
Training FLOPs are counted for every row (the elastic run replays every sub-model its sampler drew). Arms run
in parallel with one thread each on CPU; finished arms are cached under --cache by their config, so the twins
and (f) of one seed serve every recipe. Nothing is asserted: it is a benchmark.

With --tune-lr no arm trains at a learning rate chosen for another: on the first seed, the elastic run, (f), each
twin and each distillation ((c) and (m) per member) is trained at a grid of peak learning rates around the preset's
(0.5x, 1x, 2x, 4x, extended until the best has a worse rate on both sides: benchmarks/lr_grid.py), and every seed
then trains each arm at its own best. The elastic run is tuned on the mean validation loss of its panel (the full
model, the smallest sub-model and those in between), every other arm on its own validation loss. The sweep
(arm x rate -> loss, and its compute) is stored beside the results as lr-sweep.json, so a sweep is run once per
architecture and a rerun (or a cleared cache) does not repeat it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from claim_arms import (  # noqa: E402
    DEVICE,
    SWEEP_RECORD,
    Arms,
    LrTuner,
    use_one_thread,
)
from claim_recipes import RECIPES, recipe_overrides  # noqa: E402
from claim_report import TUNED, family_costs, report  # noqa: E402

from models.accounting import subnet_cost  # noqa: E402
from models.checkpoint import load_model  # noqa: E402
from models.extract import subnet_config  # noqa: E402
from models.subnet import ElasticSpace, Importance, SubnetSpec  # noqa: E402
from registry.tracking import RunLogger  # noqa: E402
from tasks.common.plots import plot_claim  # noqa: E402
from tasks.common.throughput import training_flops  # noqa: E402
from tasks.data.corpus import prepare_data  # noqa: E402
from tasks.extract.distill import student_val_loss  # noqa: E402
from tasks.pipeline_config import PipelineConfig, load_pipeline_config, parse_overrides  # noqa: E402
from tasks.pretrain.config import PretrainConfig, SamplingConfig  # noqa: E402
from tasks.pretrain.sampling import plan_step  # noqa: E402
from tasks.pretrain.validation_panel import evaluate_panel, evaluation_panel  # noqa: E402
from tasks.search.config import SearchConfig  # noqa: E402
from tasks.search.importance import rank_importance  # noqa: E402
from tasks.search.search import run_search  # noqa: E402

MEMBER_BUDGETS = {
    "ERNIE 5.1 cut": {"total_params_fraction": 0.34, "active_params_fraction": 0.5},
    "active <= 60%": {"active_params_fraction": 0.6},
    "active <= 75%": {"active_params_fraction": 0.75},
    "active <= 90%": {"active_params_fraction": 0.9},
}


def elastic_run_flops(config: PretrainConfig) -> float:
    """Training FLOPs of an elastic run: every member its sampler drew at every step, replayed."""
    importance, total = Importance.identity(config.model), config.total_steps()
    return sum(
        training_flops(
            config.model,
            plan_step(config.sampling, config.elastic, config.model, importance, config.seed, step, total).members,
            config.seq_len,
            config.tokens_per_step(),
        )
        for step in range(total)
    )


def alone(config: PretrainConfig, arch) -> PretrainConfig:
    """`config`'s loop on architecture `arch` alone (policy `full`): a twin, or the full model for (f)."""
    space = ElasticSpace(depths=(arch.n_layers,), expert_counts=(arch.n_experts,), top_ks=(arch.top_k,))
    return config.model_copy(
        update={"model": arch, "elastic": space, "sampling": SamplingConfig(policy="full"), "rerank_interval": None}
    )


def run_seed(pipeline: PipelineConfig, recipe: str, seed: int, arms: Arms, tuner: LrTuner | None = None) -> dict:
    """Every row for one seed of one recipe; returns them as a JSON-able dict. With `tuner`, every arm trains at its
    own tuned learning rate (swept first if this is the first seed to need it)."""
    pipeline = pipeline.model_copy(
        update={
            "pretrain": pipeline.pretrain.model_copy(update={"seed": seed}),
            "importance": pipeline.importance.model_copy(update={"seed": seed}),
            "extract": pipeline.extract.model_copy(update={"seed": seed}),
        }
    )
    pretrain, importance, extract, data = pipeline.pretrain, pipeline.importance, pipeline.extract, arms.data
    tokens = pretrain.tokens_per_step() * pretrain.total_steps()
    val = data.split("val")

    def own_loss(arm: dict) -> float:
        return student_val_loss(load_model(arm["checkpoint_dir"], DEVICE).eval(), data, extract)

    def panel_loss(arm: dict) -> float:
        """The elastic run's score: the mean over its validation panel (full model, smallest and between)."""
        model = load_model(arm["checkpoint_dir"], DEVICE).eval()
        shape = (extract.batch_size, extract.seq_len, extract.eval_batches, DEVICE)
        return statistics.mean(evaluate_panel(model, evaluation_panel(pretrain, model), val, *shape).values())

    def trained(config: PretrainConfig, label: str, loss: Callable[[dict], float], flops: float):
        """The arm of `config`, trained at its tuned learning rate when tuning: (its config, its result)."""
        if tuner is not None:
            config = tuner.pretrain(config, label, loss, flops)
        return config, arms.train(config).result()

    def distilled(kind: str, teacher: tuple[PretrainConfig, dict], spec: SubnetSpec, twin_flops: float):
        """A distillation of `spec` from the teacher arm, at its tuned learning rate when tuning: (lr, result)."""
        settings = extract
        if tuner is not None:
            label = f"{kind} {spec.describe()} of {recipe.split('+')[0] if kind == '(c)' else 'the full model'}"
            flops = extract.distill_compute_fraction * twin_flops
            teacher_dir = teacher[1]["checkpoint_dir"]
            settings = tuner.extract(teacher[0], teacher_dir, spec, extract, tokens, arm=label, flops_per_rate=flops)
        return settings.optim.lr, arms.distill(teacher[1]["checkpoint_dir"], spec, settings, tokens).result()

    full_arch, full_cost = pretrain.model, subnet_cost(pretrain.model)
    full_flops = training_flops(full_arch, [None], pretrain.seq_len, tokens)
    with ThreadPoolExecutor(16) as threads:
        full_future = threads.submit(
            trained, alone(pretrain, full_arch), f"(f) full model alone {SubnetSpec.full(full_arch).describe()}",
            own_loss, full_flops,
        )  # fmt: skip
        elastic_label = f"(a) elastic run {recipe.split('+')[0]}"
        elastic_config, elastic = trained(pretrain, elastic_label, panel_loss, elastic_run_flops(pretrain))
        supernet = load_model(elastic["checkpoint_dir"], DEVICE).eval()
        rank_importance(supernet, data, importance, pretrain.elastic, pipeline.search.seq_len)  # nested orders kept

        def objective(spec: SubnetSpec) -> float:
            shape = (pipeline.search.eval_batch_size, pipeline.search.seq_len, pipeline.search.eval_batches)
            return evaluate_panel(supernet, {"s": spec}, val, *shape, DEVICE)["s"]

        members: dict[str, SubnetSpec] = {}
        for label, budget in MEMBER_BUDGETS.items():
            search = SearchConfig.model_validate(
                {
                    **pipeline.search.model_dump(),
                    "total_params_fraction": None,
                    "active_params_fraction": None,
                    **budget,
                }
            )
            found = run_search(search, supernet.config, pretrain.elastic, supernet.importance(), objective)
            members[label] = found.chosen.spec
        archs = {label: subnet_config(pretrain.model, spec) for label, spec in members.items()}
        twin_flops = {label: training_flops(arch, [None], pretrain.seq_len, tokens) for label, arch in archs.items()}
        twins = {
            label: threads.submit(
                trained, alone(pretrain, arch), f"(b) twin {members[label].describe()}", own_loss, twin_flops[label]
            )
            for label, arch in archs.items()
        }
        elastic_teacher = (elastic_config, elastic)
        cuts = {
            label: threads.submit(distilled, "(c)", elastic_teacher, spec, twin_flops[label])
            for label, spec in members.items()
        }
        full_config, full = full_future.result()
        parent = load_model(full["checkpoint_dir"], DEVICE).eval()
        # Minitron ranks the trained parent's own layers and experts (no nesting to respect)
        unnested = pretrain.elastic.model_copy(update={"layer_sampling": "random", "expert_sampling": "random"})
        rank_importance(parent, data, importance, unnested, pipeline.search.seq_len)
        prunes = {}
        for label, spec in members.items():
            shape = (len(spec.layers), spec.moe_expert_counts[0], spec.top_k)
            same_shape = parent.importance().spec(parent.config, *shape)
            prunes[label] = threads.submit(distilled, "(m)", (full_config, full), same_shape, twin_flops[label])

        rows = {
            "elastic": {
                "flops": elastic_run_flops(pretrain),
                "val": student_val_loss(supernet, data, extract),
                "curve": elastic["curve"],
                "params": full_cost.total_params,
                "active": full_cost.active_params,
                "lr": elastic_config.optim.lr,
            },
            "full_alone": {
                "flops": full_flops,
                "val": student_val_loss(parent, data, extract),
                "curve": full["curve"],
                "params": full_cost.total_params,
                "active": full_cost.active_params,
                "lr": full_config.optim.lr,
            },
            "members": {},
        }
        for label, spec in members.items():
            cost = subnet_cost(pretrain.model, spec)
            twin_config, twin = twins[label].result()
            (cut_lr, cut), (prune_lr, prune) = cuts[label].result(), prunes[label].result()
            rows["members"][label] = {
                "spec": spec.describe(),
                "layers": list(spec.layers),
                "params": cost.total_params,
                "active": cost.active_params,
                "twin_flops": twin_flops[label],
                "twin_curve": twin["curve"],
                "twin": own_loss(twin),
                "twin_lr": twin_config.optim.lr,
                "cut": cut["cut"],
                "distilled": cut["distilled"],
                "distill_lr": cut_lr,
                "distill_flops": cut["fraction"] * twin_flops[label],
                "distill_curve": cut["curve"],
                "minitron_curve": prune["curve"],
                "minitron_cut": prune["cut"],
                "minitron": prune["distilled"],
                "minitron_lr": prune_lr,
                "minitron_flops": prune["fraction"] * twin_flops[label],
            }
    return {
        "recipe": recipe + (TUNED if tuner is not None else ""),
        "seed": seed,
        "tokens": tokens,
        "rows": rows,
        "tokens_per_active_param": tokens / full_cost.active_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="claim")
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        help=f"one of {sorted(RECIPES)}, or several joined by '+' (later ones override earlier ones)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every recipe")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "claim", help="arms, results, report")
    parser.add_argument("--workers", type=int, default=None, help="parallel arms (default: 2 on CPU, 1 on GPU)")
    parser.add_argument("--report", action="store_true", help="only print the table and write the PNG")
    parser.add_argument("--results", type=Path, default=None, help="per-seed JSON (default: CACHE/CONFIG/results)")
    parser.add_argument(
        "--tune-lr",
        action="store_true",
        help=f"every arm at its own best peak learning rate, swept on the first seed ({SWEEP_RECORD} in --results)",
    )
    args = parser.parse_args()
    results = args.results or args.cache / args.config / "results"
    results.mkdir(parents=True, exist_ok=True)
    workers = args.workers or (1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1))
    if not torch.cuda.is_available():
        use_one_thread()
    jobs = [(recipe, seed) for recipe in ([] if args.report else (args.recipe or ["random"])) for seed in args.seeds]
    pipelines = {
        recipe: load_pipeline_config(args.config, {**recipe_overrides(recipe), **parse_overrides(args.set)})
        for recipe, _ in jobs
    }
    if jobs:
        data = prepare_data(next(iter(pipelines.values())).data)
        spawn = multiprocessing.get_context("spawn")  # a forked worker cannot use CUDA once the parent has
        with (
            ProcessPoolExecutor(workers, spawn, initializer=use_one_thread) as pool,
            ThreadPoolExecutor(len(jobs)) as threads,
        ):
            arms = Arms(pool, args.cache / args.config, data)
            tuner = LrTuner(arms, results / SWEEP_RECORD) if args.tune_lr else None
            # with tuning, the first seed of every recipe runs (and sweeps) before the other seeds train at its rates
            first = min(args.seeds)
            phases = [[j for j in jobs if j[1] == first], [j for j in jobs if j[1] != first]] if tuner else [jobs]
            for phase in phases:
                futures = {
                    threads.submit(run_seed, pipelines[recipe], recipe, seed, arms, tuner): (recipe, seed)
                    for recipe, seed in phase
                }
                for future in as_completed(futures):
                    run = future.result()
                    (results / f"{run['recipe']}-seed{run['seed']}.json").write_text(json.dumps(run, indent=1))
                    print(report([run]), flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("*-seed*.json"))]
    if not runs:
        return
    sweeps = json.loads((results / SWEEP_RECORD).read_text()) if (results / SWEEP_RECORD).is_file() else {}
    table = report(runs, sweeps)
    pngs = [
        plot_claim(runs, recipe, args.cache / args.config / f"claim-{recipe}.png")
        for recipe in sorted({r["recipe"] for r in runs})
    ]
    (args.cache / args.config / "report.md").write_text(table)
    logger = RunLogger(args.cache / args.config, run_name="train-once-claim", tags={"benchmark": "train_once"})
    for run in runs:
        costs = family_costs(run)
        prefix = re.sub(r"[^\w\-. :/]", "_", f"{run['recipe']}/seed{run['seed']}/")  # MLflow's metric-name rules
        metrics = {
            prefix + "elastic_full": run["rows"]["elastic"]["val"],
            prefix + "full_alone": run["rows"]["full_alone"]["val"],
            prefix + "family_cost_ratio": costs["family"] / costs["separate"],
        }
        for label, m in run["rows"]["members"].items():
            name = re.sub(r"[^\w\-.]", "_", label.replace("<=", "le").replace("%", "pct"))
            for key in ("twin", "cut", "distilled", "minitron"):
                metrics[f"{prefix}{name}/{key}"] = m[key]
        logger.log_metrics(metrics, step=0)
    for png in pngs:
        logger.log_artifact(png, "plots")
    logger.log_artifact(args.cache / args.config / "report.md", "report")
    logger.finish()
    print(
        f"\n{args.config}: validation loss in nats/token on the held-out split; command: "
        f"{' '.join(['benchmarks/train_once.py', *sys.argv[1:]])}\n"
    )
    print(table)
    print("\nPNG: " + ", ".join(str(p) for p in pngs))


if __name__ == "__main__":
    main()
