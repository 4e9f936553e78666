"""Greedy decoding speed, batch 1, on the same weights and prompts: PyTorch eager with our KV cache,
transformers' `generate` (Ernie4_5_MoeForCausalLM loaded with the same weights), and onnxruntime fp32 / INT8 /
INT4 packages with the KV cache (the exact files `trainonce serve` runs).

    .venv/bin/python benchmarks/generate_speed.py                      # vocab 8192, d 256, 4 layers, 8 experts top-2
    .venv/bin/python benchmarks/generate_speed.py --model runs/pipeline/align/<subnet>/dpo   # a trained model

Every runtime is forced to generate exactly --new-tokens tokens per prompt (no early stop), and the token
sequences are compared with PyTorch's, so the figures are for the same work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.chat_format import SPECIAL_TOKENS, ChatFormat
from models.checkpoint import load_model
from models.config import MoEConfig
from models.generate import greedy_generate
from models.hf import hf_config_dict, to_hf_state_dict
from models.moe import ElasticMoE
from serving.engine import EVERY_TOKEN, MODEL_FILE, ChatPackage
from tasks.deploy.config import DeployConfig
from tasks.deploy.onnx_export import build_packages


def timed(run: Callable[[list[int]], list[int]], prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """tokens/s over all prompts after one warm-up run, and the generated ids per prompt."""
    run(prompts[0])
    outputs, start = [], time.perf_counter()
    for prompt in prompts:
        outputs.append(run(prompt))
    return sum(len(o) for o in outputs) / (time.perf_counter() - start), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved trainonce model folder (default: random weights at the shape below)")
    parser.add_argument("--tokenizer", help="tokenizer.json to package with the model (default: a byte-level stub)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.model:
        model = load_model(args.model).eval()
    else:
        config = MoEConfig(
            vocab_size=args.vocab,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=4,
            n_kv_heads=2,
            n_experts=args.experts,
            top_k=args.top_k,
            expert_ffn_dim=args.expert_ffn,
            n_shared_experts=1,
            max_seq_len=512,
        )
        model = ElasticMoE(config).eval()
    config = model.config
    prompts = [torch.randint(6, config.vocab_size, (args.prompt_len,)).tolist() for _ in range(args.prompts)]
    n = args.new_tokens
    print(
        f"model: {model.num_parameters():,} parameters, vocab {config.vocab_size}, d {config.d_model}, "
        f"{config.n_layers} layers, {config.n_experts} experts top-{config.top_k}; {args.prompts} prompts of "
        f"{args.prompt_len} tokens, {n} new tokens each, batch 1, {args.threads} threads"
    )

    results: dict[str, tuple[float, list[list[int]]]] = {}
    with torch.no_grad():
        results["pytorch eager fp32 + KV cache"] = timed(
            lambda p: greedy_generate(model, torch.tensor([p]), n)[0, len(p) :].tolist(), prompts
        )

    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_dict(config))).eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    def hf_generate(prompt: list[int]) -> list[int]:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
        return out[0, len(prompt) :].tolist()

    with torch.no_grad():
        results["transformers generate fp32"] = timed(hf_generate, prompts)

    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = Path(args.tokenizer) if args.tokenizer else _byte_tokenizer(Path(folder) / "tokenizer.json")
        packages = build_packages(model, tokenizer, ChatFormat(), Path(folder), DeployConfig())
        for variant, directory in packages.items():
            package = ChatPackage(directory, threads=args.threads)
            sizes[variant] = (directory / MODEL_FILE).stat().st_size
            results[f"onnxruntime {variant} + KV cache"] = timed(
                lambda p, package=package: list(package.complete(p, n, EVERY_TOKEN).token_ids), prompts
            )

    reference_speed, reference_ids = results["pytorch eager fp32 + KV cache"]
    print(f"\n{'runtime':<34}{'tokens/s':>10}{'vs eager':>10}{'same tokens':>13}{'file (MB)':>11}")
    for name, (speed, ids) in results.items():
        same = sum(a == b for o, r in zip(ids, reference_ids, strict=True) for a, b in zip(o, r, strict=True))
        variant = name.split()[1] if name.startswith("onnxruntime") else None
        size = f"{sizes[variant] / 1e6:.2f}" if variant else "-"
        print(f"{name:<34}{speed:>10,.0f}{speed / reference_speed:>9.2f}x{same / (n * len(prompts)):>12.1%}{size:>11}")


def _byte_tokenizer(path: Path) -> Path:
    """A throwaway tokenizer with our special tokens, for packaging a random-weight model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.save(str(path))
    return path


if __name__ == "__main__":
    main()
