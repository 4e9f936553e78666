"""Does GRPO add held-out exact match after DPO, beyond the run-to-run spread, and keep perplexity?

    .venv/bin/python benchmarks/grpo_gain.py --workdir runs/grpo-demo --config tiny-grpo --seeds 0 1 2 3 4 5

Takes the workdir's last DPO model (`trainonce-chat-torch`, stage dpo) and its SFT parent, then for each seed runs
the GRPO stage (tasks.align.grpo, the preset's `grpo` section with `--set grpo.KEY=VALUE` overrides, on the prompts
tasks.align.grpo.grpo_prompts gives it) from the same DPO model and measures, on the held-out split the alignment stage
uses: exact match per task (greedy, pass@1) of SFT, DPO and GRPO, GRPO's pass@k, and validation perplexity of SFT
and GRPO on the same windows. Prints one row per seed, then the mean and the spread (max - min) of the gain over
DPO. Nothing is asserted: it is a benchmark.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from models.chat_format import ChatTokenizer
from models.checkpoint import load_model
from registry.models import download_checkpoint, version_tags
from registry.names import CHAT_TORCH_MODEL
from registry.tracking import store_client
from tasks.align.config import GRPOConfig
from tasks.align.grpo import grpo_prompts, rollout, run_grpo
from tasks.align.sft import exact_match
from tasks.data.corpus import PreparedData, prepare_data
from tasks.data.task_mix import Example, corpus_passages, generate_splits
from tasks.pipeline_config import load_pipeline_config, parse_overrides
from tasks.pretrain.validation_panel import evaluate_panel


def latest_version(workdir: str, stage: str) -> str:
    versions = store_client(workdir).search_model_versions(f"name='{CHAT_TORCH_MODEL}'")
    staged = [v for v in versions if v.tags.get("stage") == stage]
    if not staged:
        raise SystemExit(f"{workdir} has no {CHAT_TORCH_MODEL} version from stage {stage}: run the pipeline first")
    return max(staged, key=lambda v: int(v.version)).version


def val_ppl(model: torch.nn.Module, data: PreparedData, batches: int = 16) -> float:
    loss = evaluate_panel(model, {"model": None}, data.split("val"), 8, 128, batches, torch.device("cpu"))["model"]
    return math.exp(loss)


def sampled_success(
    model: torch.nn.Module, tokenizer: ChatTokenizer, examples: Sequence[Example], answers: int = 8
) -> dict[str, float]:
    """Per task, the share of `answers` sampled answers (temperature 1) per prompt that the checker accepts: how
    well the model does on prompts, beyond its greedy answer."""
    config = GRPOConfig(group_size=answers)
    solved: dict[str, list[float]] = {}
    for i, example in enumerate(examples):
        solved.setdefault(example.task, []).append(
            float(rollout(model, tokenizer, example, config, i).solved.float().mean())
        )
    return {task: float(np.mean(values)) for task, values in solved.items()}


def print_recall(model: torch.nn.Module, tokenizer: ChatTokenizer, splits: dict[str, Sequence[Example]]) -> None:
    """Sampled success of `model` on each split: far higher on SFT's training prompts than on unseen ones means it
    has memorised them, and rewards on them teach recall."""
    for name, examples in splits.items():
        success = sampled_success(model, tokenizer, examples)
        print(
            f"sampled success on {name} ({len(examples)} prompts): "
            + ", ".join(f"{t} {v:.2f}" for t, v in success.items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/grpo-demo")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--recall",
        action="store_true",
        help="also print DPO's sampled success on SFT's, held-out and GRPO's prompts, and each GRPO model's on the "
        "last two",
    )
    args = parser.parse_args()
    config = load_pipeline_config(args.config, parse_overrides(args.set))
    grpo = config.grpo.model_copy(update={"enabled": True})
    data = prepare_data(config.data)
    tokenizer = data.chat_tokenizer()
    passages = corpus_passages("\n".join(data.documents()))
    train, test = generate_splits(config.sft.task_mix, passages, data.images)
    prompts = grpo_prompts(grpo, config.sft.task_mix, passages, train, test, data.images)
    dpo_version = latest_version(args.workdir, "dpo")
    dpo_ckpt = download_checkpoint(args.workdir, f"{CHAT_TORCH_MODEL}/{dpo_version}")
    sft_version = version_tags(args.workdir, dpo_ckpt.version)["parent_sft_version"]
    sft = load_model(download_checkpoint(args.workdir, f"{CHAT_TORCH_MODEL}/{sft_version}").checkpoint_dir).eval()
    dpo = load_model(dpo_ckpt.checkpoint_dir).eval()
    print(f"{args.workdir}: SFT {CHAT_TORCH_MODEL}/{sft_version}, DPO {CHAT_TORCH_MODEL}/{dpo_version}; grpo {grpo}")
    if args.recall:
        print_recall(dpo, tokenizer, {"SFT's training prompts": train[::10], "held-out": test, "GRPO's": prompts[::10]})
    sft_accuracy = exact_match(sft, tokenizer, test, grpo.max_new_tokens)
    sft_ppl = val_ppl(sft, data)
    tasks = list(sft_accuracy)
    print(f"{'row':<10}" + "".join(f"{t:>11}" for t in tasks) + f"{'pass@k':>8}{'val ppl':>9}{'vs SFT':>8}{'min':>6}")
    print(f"{'SFT':<10}" + "".join(f"{sft_accuracy[t]:>11.3f}" for t in tasks) + f"{'':>8}{sft_ppl:>9.3f}")
    gains = []
    for seed in args.seeds:
        policy = copy.deepcopy(dpo)
        start = time.perf_counter()
        result = run_grpo(grpo.model_copy(update={"seed": seed}), policy, tokenizer, prompts, test, data.training_mix())
        minutes = (time.perf_counter() - start) / 60
        ppl = val_ppl(policy.eval(), data)
        before, after = result.accuracy_before, result.accuracy_after
        pass_k = result.held_out[-1]["pass_at_k"]
        if seed == args.seeds[0]:
            print(
                f"{'DPO':<10}"
                + "".join(f"{before[t]:>11.3f}" for t in tasks)
                + f"{result.held_out[0]['pass_at_k']:>8.3f}"
            )
        print(
            f"{f'GRPO s{seed}':<10}"
            + "".join(f"{after[t]:>11.3f}" for t in tasks)
            + f"{pass_k:>8.3f}{ppl:>9.3f}{ppl / sft_ppl - 1:>+8.1%}{minutes:>6.1f}",
            flush=True,
        )
        gains.append(after["overall"] - before["overall"])
        if args.recall:  # memorised GRPO's own prompts, or learnt the skill the held-out split measures?
            print_recall(policy, tokenizer, {"held-out": test, "GRPO's": prompts[:: max(1, len(prompts) // len(test))]})
    spread = max(gains) - min(gains)
    print(
        f"overall exact match gain over DPO: mean {np.mean(gains):+.3f}, "
        f"std {np.std(gains, ddof=1) if len(gains) > 1 else 0.0:.3f}, per seed {[round(g, 3) for g in gains]}, "
        f"spread {spread:.3f}"
    )


if __name__ == "__main__":
    main()
