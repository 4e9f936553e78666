"""The deploy stage's variants of a pipeline's champion under several quantization settings, side by side: the
figures the candidate is chosen on (file size, validation perplexity, held-out exact match, greedy tokens/s).

    .venv/bin/python benchmarks/quantization_settings.py --workdir runs/pipeline
    .venv/bin/python benchmarks/quantization_settings.py --workdir runs/pipeline --block-sizes 32 64 128 \\
        --accuracy-levels 0 4 --traced

The champion's PyTorch parent is exported again for every setting (`deploy.int4_block_size`,
`deploy.int4_accuracy_level`) and measured exactly as the export stage measures it (tasks/deploy/evaluate.py), so a
row is what `trainonce pipeline --set deploy....` would have registered. Nothing is asserted: it is a benchmark.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from llama_cpp_peer import trained_model  # this folder (benchmarks/), as the script runs

from tasks.data.corpus import prepare_data
from tasks.deploy.config import DeployConfig, EvaluationConfig
from tasks.deploy.evaluate import PackageEvaluation, evaluate_package, held_out_examples
from tasks.deploy.onnx_export import build_packages
from tasks.pipeline_config import load_pipeline_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a pipeline workdir with a champion")
    parser.add_argument("--config", default="tiny", help="preset whose data and tasks the model was trained on")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--accuracy-levels", type=int, nargs="+", default=[4])
    parser.add_argument("--variants", nargs="+", default=["int8", "int4", "int2"])
    parser.add_argument("--traced", action="store_true", help="also the traced graph (deploy.graph: traced)")
    args = parser.parse_args()
    preset = load_pipeline_config(args.config)
    data = prepare_data(preset.data)
    examples = held_out_examples(data, preset.sft.task_mix)
    model = trained_model(args.workdir)
    folder = Path(tempfile.mkdtemp(prefix="quantization-settings-"))
    settings = {
        f"fused, block {block}, accuracy level {level}": DeployConfig(
            variants=tuple(args.variants), int4_block_size=block, int4_accuracy_level=level
        )
        for block, level in itertools.product(args.block_sizes, args.accuracy_levels)
    }
    if args.traced:
        settings["traced (blocks of 64 for INT4)"] = DeployConfig(graph="traced", variants=("int8", "int4"))
    reference: PackageEvaluation | None = None
    print(f"{'setting':<36}{'variant':<8}{'KB':>8}{'ppl':>9}{'vs fp32':>9}{'exact':>7}{'tok/s':>8}")
    for index, (name, config) in enumerate(settings.items()):
        packages = build_packages(model, data.tokenizer_path, data.chat_format, folder / str(index), config)
        for variant, package in packages.items():
            if variant == "fp32" and reference is not None:
                continue  # one fp32 reference: every setting's fp32 graph is the same
            e = evaluate_package(package, data, examples, EvaluationConfig())
            reference = reference or e
            print(
                f"{name:<36}{variant:<8}{e.size_bytes / 1024:>8,.0f}{e.val_ppl:>9.3f}"
                f"{e.val_ppl / reference.val_ppl - 1:>+9.2%}{e.accuracy['overall']:>7.3f}{e.tokens_per_second:>8,.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
