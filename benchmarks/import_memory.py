"""Print the host memory `trainonce import-hf` needs, measured on a random transformers ERNIE 4.5 MoE checkpoint
of the size you ask for (bf16 shards, as Baidu publishes them), and what that predicts for ERNIE-4.5-21B-A3B.

    .venv/bin/python benchmarks/import_memory.py [--hidden 1024 --layers 12 --experts 48 --expert-size 512]

The import runs in a fresh process (`resource` peak RSS of the child), so the figure is the whole command's:
interpreter, torch, MLflow, the fp32 model and safetensors' copy while writing it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

from models.accounting import subnet_cost
from models.chat_format import END_OF_TEXT, END_OF_TURN, TRAINONCE_TEMPLATE
from models.hf import config_from_hf
from tasks.data.corpus import train_tokenizer

# transformers' Ernie4_5_MoeConfig defaults are baidu/ERNIE-4.5-21B-A3B-PT's config.json
ERNIE_21B_PARAMS = subnet_cost(config_from_hf(Ernie4_5_MoeConfig().to_dict()), None).total_params


def write_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """A random checkpoint with a trainonce tokenizer and chat template; returns its parameter count."""
    tokenizer = train_tokenizer(["To be, or not to be: that is the question."] * 50, 300)
    config = Ernie4_5_MoeConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        moe_num_experts=args.experts,
        moe_k=6,
        moe_intermediate_size=args.expert_size,
        moe_num_shared_experts=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Ernie4_5_MoeForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TRAINONCE_TEMPLATE, "eos_token": END_OF_TEXT, "pad_token": "<|pad|>"})
    )
    ids = [tokenizer.token_to_id(END_OF_TURN), tokenizer.token_to_id(END_OF_TEXT)]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return subnet_cost(config_from_hf(config.to_dict()), None).total_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=48)
    parser.add_argument("--expert-size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        source, workdir = Path(scratch) / "checkpoint", Path(scratch) / "registry"
        params = write_checkpoint(source, args)
        files = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "import-hf", str(source), "--workdir", str(workdir)], check=True
        )
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    fp32 = 4 * params
    print(f"checkpoint: {params / 1e9:.3f} B parameters, {files / 2**30:.2f} GiB of bf16 safetensors")
    print(f"import-hf: {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB = {peak / fp32:.2f} x the fp32 model")
    overhead = peak - 2 * fp32
    print(f"fixed overhead beyond 2 x fp32 model: {overhead / 2**30:.2f} GiB")
    predicted = 2 * 4 * ERNIE_21B_PARAMS + max(overhead, 0)
    print(f"ERNIE-4.5-21B-A3B ({ERNIE_21B_PARAMS / 1e9:.2f} B): predicted peak {predicted / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
