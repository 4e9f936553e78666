"""Throughput accounting: training FLOPs per step and model FLOPs utilisation against the device's peak."""

from __future__ import annotations

import functools
import time

import torch

from models.accounting import subnet_cost
from models.config import MoEConfig
from models.subnet import SubnetSpec

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, FLOP/s.
GPU_BF16_PEAKS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12}


def training_flops(config: MoEConfig, specs: list[SubnetSpec | None], seq_len: int, tokens: int) -> float:
    """FLOPs of forward + backward (3x forward) for every sub-model trained on `tokens` tokens."""
    return sum(3.0 * subnet_cost(config, spec, seq_len).forward_flops_per_token * tokens for spec in specs)


@functools.cache
def measured_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul rate of this CPU with the current torch threads: the reference for CPU MFU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def device_peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s MFU is measured against: the override, a known GPU's bf16 peak, or the measured CPU rate."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAKS.items():
            if key in name:
                return peak if precision in ("bf16", "fp16") else peak / 2  # TF32 runs at half the bf16 rate
        raise ValueError(f"peak_tflops: unknown GPU {name!r}; set pretrain.peak_tflops for MFU")
    return measured_cpu_peak_flops()
