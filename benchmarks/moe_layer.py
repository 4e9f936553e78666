"""MoE layer forward+backward throughput: grouped-GEMM path vs the simple loop path (and the export path).

    .venv/bin/python benchmarks/moe_layer.py                      # CPU, fp32, 2 threads
    .venv/bin/python benchmarks/moe_layer.py --tokens 16384 --d-model 1024 --ffn 2816   # on a GPU (bf16)

Prints tokens/s and achieved TFLOP/s per path; nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.config import MoEConfig
from models.moe import EXPERT_PATHS, MoEBlock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = MoEConfig(
        d_model=args.d_model,
        n_heads=max(1, args.d_model // 64),
        n_kv_heads=max(1, args.d_model // 64),
        n_experts=args.experts,
        top_k=args.top_k,
        expert_ffn_dim=args.ffn,
        n_shared_experts=0,
    )
    x = torch.randn(1, args.tokens, args.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    # routed expert matmuls only: 3 matrices x 2 FLOPs x top_k per token, x3 for forward + backward
    flops = 3 * 2 * 3 * args.d_model * args.ffn * args.top_k * args.tokens
    print(
        f"device {device}, {dtype}, {args.tokens} tokens, d_model {args.d_model}, expert FFN {args.ffn}, "
        f"{args.experts} experts top-{args.top_k}"
    )
    for impl in EXPERT_PATHS:
        block = MoEBlock(config.model_copy(update={"expert_impl": impl}), layer=0).to(device)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        block = block.to(dtype)

        def step(block: MoEBlock = block) -> None:
            out, _ = block(x.requires_grad_(True))
            out.backward(grad)

        try:
            for _ in range(2):
                step()
        except RuntimeError as error:  # e.g. a kernel this device lacks
            print(f"{impl:<11} unavailable here: {str(error).splitlines()[0]}")
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        print(
            f"{impl:<11} {args.tokens / seconds:>12,.0f} tokens/s  {seconds * 1e3:8.2f} ms  "
            f"{flops / seconds / 1e12:7.3f} TFLOP/s (fwd+bwd)"
        )


if __name__ == "__main__":
    main()
