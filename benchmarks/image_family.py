"""Images in the elastic MoE, measured: what a model trained on text and image-text documents can do with images,
what the images cost the text, shared (ERNIE 5.0) against heterogeneous (ERNIE 4.5) routing, and the elastic claim
for images (the ERNIE 5.1 cut against its twin trained alone on the same tokens).

    .venv/bin/python benchmarks/image_family.py --seeds 0 1 2                  # 2 arms at a time, one thread each
    .venv/bin/python benchmarks/image_family.py --seeds 0 --steps 300          # a short calibration run

Arms, every one pre-trained for --steps on the same number of tokens: (T) tiny, text only; (S) tiny-images, shared
routing; (H) tiny-images-het, heterogeneous routing. For S and H, the ERNIE 5.1 cut (<= 34% of the parameters, <= 50%
active; searched on the text and image-text validation losses, weighed by the preset's search.image_loss_weight)
is extracted and distilled at
extract.distill_compute_fraction of its twin's compute, and its twin (the same architecture alone) is trained on the
same mixed tokens. Figures, on base models (no alignment):
  understanding: the 360 held-out digits as `<image>...</image> This is a `: the most likely next digit token;
  generation: `A handwritten {d}: <image>`, then one image's codes sampled at temperature 1 (20 per digit) and
  greedy, read by the digit judge;
  text: the full model's validation loss on the text windows every run shares (T's is what images cost);
  image-text: the validation loss on the held-out image documents; routing: the mean modality purity.
Chance is 0.1; the ceilings are the judge's accuracy on the real held-out digits and on their 8-code
reconstructions. Finished arms are cached under --cache by steps, arm, seed (and the cut's spec), not by --set:
give another --cache when changing a setting. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.checkpoint import load_model, save_model  # noqa: E402
from models.extract import extract_subnet, subnet_config  # noqa: E402
from models.moe import ElasticMoE  # noqa: E402
from models.subnet import ElasticSpace, SubnetSpec  # noqa: E402
from tasks.data.corpus import PreparedData, prepare_data  # noqa: E402
from tasks.data.images import CAPTIONS_BEFORE, PreparedImages  # noqa: E402
from tasks.extract.distill import distill_subnet  # noqa: E402
from tasks.pipeline_config import PipelineConfig, load_pipeline_config, parse_overrides  # noqa: E402
from tasks.pretrain.config import PretrainConfig, SamplingConfig  # noqa: E402
from tasks.pretrain.loop import run_pretrain  # noqa: E402
from tasks.pretrain.modality_routing import measure_modality_routing  # noqa: E402
from tasks.pretrain.validation_panel import evaluate_panel  # noqa: E402
from tasks.search.config import SearchConfig  # noqa: E402
from tasks.search.importance import rank_importance  # noqa: E402
from tasks.search.search import ValidationObjective, run_search  # noqa: E402

MODES = {"text": "tiny", "shared": "tiny-images", "heterogeneous": "tiny-images-het"}
CUT = {"total_params_fraction": 0.34, "active_params_fraction": 0.5}  # ERNIE 5.1's
SAMPLES_PER_DIGIT = 20
EVAL = (16, 128, 8)  # validation batch size, length, batches: 131,072 tokens per stream


def arm(config_json: str, data_dir: str, out: str) -> str:
    """Pre-train one arm (resumed, or read back when finished) on one thread: the supernet's folder."""
    torch.set_num_threads(1)
    config = PretrainConfig.model_validate_json(config_json)
    return str(run_pretrain(config, PreparedData.load(data_dir), out).checkpoint_dir)


def label(spec: SubnetSpec) -> str:
    """A spec as part of a folder name: `L3E4k1`."""
    return spec.describe().replace(" ", "")


def alone(config: PretrainConfig, spec: SubnetSpec) -> PretrainConfig:
    """`config`'s loop on the architecture `spec` cuts, trained alone (its twin)."""
    arch = subnet_config(config.model, spec)
    pools = arch.expert_pools(arch.first_dense_layers)
    space = ElasticSpace(depths=(arch.n_layers,), expert_counts=(min(map(len, pools)),), top_ks=(arch.top_k,))
    return config.model_copy(
        update={"model": arch, "elastic": space, "sampling": SamplingConfig(policy="full"), "rerank_interval": None}
    )


@torch.no_grad()
def understanding(model: ElasticMoE, data: PreparedData, images: PreparedImages) -> float:
    """Held-out digits read right: the most likely digit token after `<image>...</image> This is a `. The bundled
    BPE writes " 3" as `Ġ` then `3`, so the prompt ends with the space and the digit is the next token."""
    tokenizer, image_tokenizer = data.tokenizer(), images.image_tokenizer
    held_out = images.split("held_out")
    prompts = [
        tokenizer.encode(f"{image_tokenizer.text(image_tokenizer.encode(p))} This is a ").ids for p in held_out.pixels
    ]
    digits = [tokenizer.token_to_id(str(d)) for d in range(10)]
    logits = model(torch.tensor(prompts)).logits[:, -1, digits]
    return float((logits.argmax(dim=-1).numpy() == held_out.labels).mean())


@torch.no_grad()
def generation(model: ElasticMoE, data: PreparedData, images: PreparedImages, seed: int) -> dict[str, float]:
    """Digits drawn right, as the judge reads them: sampled at temperature 1 and greedy."""
    tokenizer, image_tokenizer = data.tokenizer(), images.image_tokenizer
    first, count = data.image_tokens or (0, 0)
    prompts = [tokenizer.encode(CAPTIONS_BEFORE[0].format(digit=d) + " <image>").ids for d in range(10)]
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for name, repeats in (("sampled", SAMPLES_PER_DIGIT), ("greedy", 1)):
        tokens = torch.tensor([p for p in prompts for _ in range(repeats)])
        for _ in range(image_tokenizer.codes_per_image):
            logits = model(tokens).logits[:, -1, first : first + count]
            if name == "greedy":
                code = logits.argmax(dim=-1)
            else:
                code = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            tokens = torch.cat([tokens, (code + first)[:, None]], dim=1)
        codes = (tokens[:, -image_tokenizer.codes_per_image :] - first).tolist()
        drawn = np.stack([image_tokenizer.decode(c) for c in codes])
        wanted = np.repeat(np.arange(10), repeats)
        scores[name] = float((images.judge.predict(drawn) == wanted).mean())
    return scores


def measure(model: ElasticMoE, data: PreparedData, seed: int) -> dict:
    """Every figure of one model: text and image-text validation loss, and with images the image accuracies."""
    model = model.eval()
    row = {"text_val": evaluate_panel(model, {"m": None}, data.split("val"), *EVAL, torch.device("cpu"))["m"]}
    images = data.images
    if images is not None and data.image_tokens is not None:
        row["image_val"] = evaluate_panel(model, {"m": None}, data.image_split("val"), *EVAL, torch.device("cpu"))["m"]
        row["understanding"] = understanding(model, data, images)
        row["generation"] = generation(model, data, images, seed)
        routing = measure_modality_routing(model, data.training_mix("val"), data.image_tokens, 16, 128)
        row["mean_purity"] = routing.mean_purity
    return row


def run(args: argparse.Namespace) -> list[dict]:
    configs: dict[str, PipelineConfig] = {
        mode: load_pipeline_config(preset, parse_overrides([f"pretrain.max_steps={args.steps}", *args.set]))
        for mode, preset in MODES.items()
    }
    data = {mode: prepare_data(config.data) for mode, config in configs.items()}
    cache = args.cache / f"steps{args.steps}"
    results = []
    with ProcessPoolExecutor(args.workers) as pool:

        def pretrained(mode: str, config: PretrainConfig, name: str):
            return pool.submit(arm, config.model_dump_json(), str(data[mode].directory), str(cache / name))

        supernets = {
            (mode, seed): pretrained(mode, configs[mode].pretrain.model_copy(update={"seed": seed}), f"{mode}-{seed}")
            for seed in args.seeds
            for mode in MODES
        }
        for seed in args.seeds:
            row: dict = {"seed": seed, "steps": args.steps}
            cuts, twins = {}, {}
            for mode in MODES:
                pipeline, mode_data = configs[mode], data[mode]
                supernet = load_model(supernets[mode, seed].result()).eval()
                row[mode] = measure(supernet, mode_data, seed)
                if mode == "text":
                    continue
                pretrain = pipeline.pretrain.model_copy(update={"seed": seed})
                rank_importance(supernet, mode_data, pipeline.importance, pretrain.elastic, pipeline.search.seq_len)

                search = SearchConfig.model_validate({**pipeline.search.model_dump(), **CUT})  # the preset's weight
                objective = ValidationObjective(supernet, mode_data, search)
                found = run_search(search, supernet.config, pretrain.elastic, supernet.importance(), objective)
                spec = found.chosen.spec
                cuts[mode] = (spec, supernet)
                twins[mode] = pretrained(mode, alone(pretrain, spec), f"{mode}-twin-{label(spec)}-{seed}")
            for mode, (spec, supernet) in cuts.items():
                folder = cache / f"{mode}-cut-{label(spec)}-{seed}"
                if not (folder / "config.json").is_file():
                    student = extract_subnet(supernet, spec)
                    tokens = configs[mode].pretrain.tokens_per_step() * configs[mode].pretrain.total_steps()
                    distill_subnet(student, supernet, data[mode], configs[mode].extract, tokens)
                    save_model(student, folder)
                row[f"{mode}_cut"] = {"spec": spec.describe(), **measure(load_model(folder), data[mode], seed)}
                row[f"{mode}_twin"] = measure(load_model(twins[mode].result()), data[mode], seed)
            for mode in ("shared", "heterogeneous"):
                heatmap = cache / f"{mode}-{seed}" / "routing_modality_heatmap.png"
                if heatmap.is_file():
                    shutil.copy(heatmap, args.cache / f"heatmap-{mode}-seed{seed}.png")
            (args.cache / f"image-family-steps{args.steps}-seed{seed}.json").write_text(json.dumps(row, indent=1))
            results.append(row)
    return results


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ±{statistics.stdev(values):.3f}"


def report(results: list[dict], images: PreparedImages, command: str) -> None:
    """One table: each model's figures, mean ± sd over seeds, with chance and the ceilings."""
    held_out, tokenizer = images.split("held_out"), images.image_tokenizer
    reconstructed = np.stack([tokenizer.decode(tokenizer.encode(p)) for p in held_out.pixels])
    ceiling = float((images.judge.predict(reconstructed) == held_out.labels).mean())
    rows = [
        ("(T) text only", "text"),
        ("(S) shared routing", "shared"),
        ("(H) heterogeneous routing", "heterogeneous"),
        ("(S) ERNIE 5.1 cut, distilled", "shared_cut"),
        ("(S) its twin, alone", "shared_twin"),
        ("(H) ERNIE 5.1 cut, distilled", "heterogeneous_cut"),
        ("(H) its twin, alone", "heterogeneous_twin"),
    ]
    print(f"### Images in the elastic MoE: seeds {[r['seed'] for r in results]}, {results[0]['steps']} steps\n")
    print("| model | text val loss | image-text val loss | understanding | generation (sampled / greedy) | purity |")
    print("|---|---|---|---|---|---|")
    for label, key in rows:
        cells = [r[key] for r in results if key in r]
        if not cells:
            continue

        def column(get, cells=cells) -> str:
            values = [get(c) for c in cells if get(c) is not None]
            return mean_sd(values) if values else "-"

        spec = f" {cells[0]['spec']}" if "spec" in cells[0] else ""
        generation_cell = (
            f"{column(lambda c: c.get('generation', {}).get('sampled'))} / "
            f"{column(lambda c: c.get('generation', {}).get('greedy'))}"
        )
        losses = f"{column(lambda c: c['text_val'])} | {column(lambda c: c.get('image_val'))}"
        accuracies = f"{column(lambda c: c.get('understanding'))} | {generation_cell}"
        print(f"| {label}{spec} | {losses} | {accuracies} | {column(lambda c: c.get('mean_purity'))} |")
    print(f"\nchance 0.100; the judge on real held-out digits {images.judge.held_out_accuracy:.3f}, on their "
          f"reconstructions {ceiling:.3f} (the ceiling of generation)\ncommand: {command}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1500, help="pre-training steps of every arm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every preset")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "image-family")
    parser.add_argument("--workers", type=int, default=2, help="arms pre-trained at once, one thread each")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args)
    images = prepare_data(load_pipeline_config("tiny-images", parse_overrides(args.set)).data).images
    assert images is not None
    report(results, images, "benchmarks/image_family.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
