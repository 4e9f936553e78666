"""Training throughput and MFU: the elastic step vs the full-model-only step, and optionally the peer.

    .venv/bin/python benchmarks/train_throughput.py                        # peer shape, 2 CPU threads
    .venv/bin/python benchmarks/train_throughput.py --peer transformers    # + HF Ernie4_5_MoeForCausalLM
    .venv/bin/python benchmarks/train_throughput.py --config small --precision bf16   # on a GPU

"Peer shape" is the one the issue measured transformers at: vocab 8192, hidden 256, 4 layers, 8 experts
top-2, expert FFN 256, one shared expert, batch 8 x 256. Every variant runs in this one process with the
same threads, batch and optimizer, so the figures compare; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from models.accounting import subnet_cost
from models.config import MoEConfig
from models.moe import ElasticMoE
from tasks.common.optim import build_optimizer
from tasks.common.throughput import device_peak_flops, training_flops
from tasks.pipeline_config import load_pipeline_config
from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.step import elastic_forward_backward, plan_for_step

PEER_SHAPE = MoEConfig(
    vocab_size=8192,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    n_experts=8,
    top_k=2,
    expert_ffn_dim=256,
    n_shared_experts=1,
    max_seq_len=256,
)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def our_step(config: PretrainConfig, policy: str, device: torch.device, dtype: torch.dtype | None):
    """One optimizer step of our loop under `policy`; returns (step fn, FLOPs per step)."""
    config = config.model_copy(update={"sampling": config.sampling.model_copy(update={"policy": policy})})
    model = ElasticMoE(config.model).to(device)
    optimizer = build_optimizer(model, config.optim)
    batch = torch.randint(0, config.model.vocab_size, (config.batch_size, config.seq_len), device=device)
    specs_seen: list[list] = []

    def step() -> None:
        plan = plan_for_step(config, model, len(specs_seen))
        specs_seen.append(plan.members)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            elastic_forward_backward(model, config, batch, plan, lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens = config.batch_size * config.seq_len

    def flops_per_step() -> float:
        return sum(training_flops(config.model, s, config.seq_len, tokens) for s in specs_seen) / len(specs_seen)

    return step, flops_per_step


def transformers_step(config: PretrainConfig, device: torch.device, dtype: torch.dtype | None):
    """The peer: transformers' own Ernie4_5_MoeForCausalLM at the same shape, trained with a plain loop."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    from models.hf import hf_config_dict

    hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_dict(config.model))).to(device)
    optimizer = torch.optim.AdamW(hf.parameters(), lr=config.optim.lr)
    batch = torch.randint(0, config.model.vocab_size, (config.batch_size, config.seq_len), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = hf(input_ids=batch, labels=batch, output_router_logits=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a preset (tiny, small); default: the peer shape")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--policy", default="sandwich", choices=["random", "sandwich"])
    parser.add_argument("--peer", choices=["transformers"], default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    base = load_pipeline_config(args.config or "tiny").pretrain
    if args.config is None:
        base = PretrainConfig.model_validate(
            {
                **base.model_dump(),
                "model": PEER_SHAPE.model_dump(),
                "elastic": {"depths": [2, 3, 4], "expert_counts": [2, 4, 6, 8], "top_ks": [1, 2]},
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
            }
        )
    peak = device_peak_flops(device, "bf16" if dtype else "no")
    tokens = base.batch_size * base.seq_len
    full_cost = subnet_cost(base.model, None, base.seq_len)
    print(
        f"device {device} ({torch.get_num_threads()} threads), {args.precision}, batch {base.batch_size} x "
        f"{base.seq_len}; supernet {full_cost.total_params:,} params ({full_cost.active_params:,} active); "
        f"peak {peak / 1e12:.2f} TFLOP/s"
    )
    results = {}
    for policy in ("full", args.policy):
        step, flops = our_step(base, policy, device, dtype)
        seconds = time_steps(step, args.steps, args.warmup, device)
        results[policy] = (seconds, flops())
        print(
            f"trainonce {policy:<9} {tokens / seconds:>10,.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  "
            f"MFU {flops() / seconds / peak:6.1%}  ({flops() / 1e9:.2f} GFLOP/step)"
        )
    full_seconds, full_flops = results["full"]
    elastic_seconds, elastic_flops = results[args.policy]
    expected = full_seconds * elastic_flops / full_flops
    print(
        f"elastic overhead: {elastic_seconds / expected:.2f}x the time its FLOP share predicts "
        f"({elastic_flops / full_flops:.2f}x the full step's FLOPs)"
    )
    if args.peer == "transformers":
        seconds = time_steps(transformers_step(base, device, dtype), args.steps, args.warmup, device)
        print(
            f"transformers full   {tokens / seconds:>10,.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  "
            f"MFU {full_flops / seconds / peak:6.1%}"
        )
        print(f"trainonce full-model step vs transformers: {seconds / full_seconds:.2f}x")


if __name__ == "__main__":
    main()
