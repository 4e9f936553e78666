"""The `trainonce` command line: each stage on its own, and `demo`, the whole job on a preset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from tasks.pipeline_config import PipelineConfig, load_pipeline_config, parse_overrides


def _load(args: argparse.Namespace) -> PipelineConfig:
    try:
        return load_pipeline_config(args.config, parse_overrides(args.set))
    except ValidationError as error:
        raise SystemExit(f"invalid configuration {args.config!r}:\n{error}") from error
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from error


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from tasks.data import prepare_data

    prepared = prepare_data(_load(args).data)
    print(
        json.dumps(
            {
                "directory": str(prepared.directory),
                "fingerprint": prepared.fingerprint,
                "train_tokens": prepared.train_tokens,
                "val_tokens": prepared.val_tokens,
            },
            indent=2,
        )
    )


def cmd_pretrain(args: argparse.Namespace) -> None:
    from tasks.data import prepare_data
    from tasks.pretrain import run_pretrain

    config = _load(args)
    result = run_pretrain(config.pretrain, prepare_data(config.data), Path(args.workdir))
    print(f"supernet saved to {result.checkpoint_dir}")
    for label, loss in result.val_loss.items():
        print(f"  val loss {label:<24} {loss:.4f}")


def cmd_info(args: argparse.Namespace) -> None:
    from models.accounting import subnet_cost
    from models.subnet import Importance

    config = _load(args)
    model_config, space = config.pretrain.model, config.pretrain.elastic
    importance = Importance.identity(model_config)
    print(f"{'sub-model':<14}{'total params':>14}{'active params':>15}{'fwd MFLOP/token':>17}")
    rows = [("supernet", None), *((s.describe(), s) for s in space.enumerate(model_config, importance))]
    for label, spec in rows:
        cost = subnet_cost(model_config, spec, config.pretrain.seq_len)
        print(
            f"{label:<14}{cost.total_params:>14,}{cost.active_params:>15,}{cost.forward_flops_per_token / 1e6:>17.2f}"
        )


def cmd_demo(args: argparse.Namespace) -> None:
    """Prepare the data, pre-train the supernet, extract its smallest sub-model and check it is exact."""
    import numpy as np
    import torch

    from models.accounting import subnet_cost
    from models.checkpoint import load_model, save_model
    from models.extract import extract_subnet
    from tasks.data import prepare_data, sample_batch
    from tasks.pretrain import run_pretrain

    config = _load(args)
    workdir = Path(args.workdir)
    prepared = prepare_data(config.data)
    print(
        f"data: {prepared.train_tokens:,} train / {prepared.val_tokens:,} val tokens, "
        f"fingerprint {prepared.fingerprint[:16]}"
    )
    result = run_pretrain(config.pretrain, prepared, workdir)
    supernet = load_model(result.checkpoint_dir).eval()
    spec = config.pretrain.elastic.smallest(supernet.config, supernet.importance())
    sub = extract_subnet(supernet, spec).eval()
    save_model(sub, workdir / "smallest")
    batch = sample_batch(prepared.split("val"), 2, config.pretrain.seq_len, np.random.default_rng(0))
    with torch.no_grad():
        diff = (supernet(batch, subnet=spec).logits - sub(batch).logits).abs().max().item()
    full, small = subnet_cost(supernet.config), subnet_cost(supernet.config, spec)
    print(f"supernet: {full.total_params:,} params ({full.active_params:,} active) -> {result.checkpoint_dir}")
    print(
        f"smallest {spec.describe()}: {small.total_params:,} params ({small.active_params:,} active) "
        f"-> {workdir / 'smallest'}; extracted vs masked supernet max |diff| = {diff:.2e}"
    )
    for label, loss in result.val_loss.items():
        print(f"  val loss {label:<24} {loss:.4f}")
    print(f"throughput {result.tokens_per_second:,.0f} tokens/s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainonce", description="Train one elastic MoE, deploy many models.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler, help_text: str, workdir: bool = False) -> None:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default="tiny", help="preset in configs/ (tiny, small) or a YAML path")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set pretrain.max_steps=10",
        )
        if workdir:
            sub.add_argument("--workdir", default="runs/demo", help="folder for checkpoints and outputs")
        sub.set_defaults(handler=handler)

    add("demo", cmd_demo, "run the whole job on a preset: data, elastic pre-training, extraction", workdir=True)
    add("prepare-data", cmd_prepare_data, "tokenize the corpus into train/validation memmaps")
    add("pretrain", cmd_pretrain, "elastic pre-training of the supernet", workdir=True)
    add("info", cmd_info, "parameter and FLOP accounting of every sub-model in the elastic space")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main(sys.argv[1:])
