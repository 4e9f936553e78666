"""Symmetric block-wise weight quantization in the layout of onnxruntime's MatMulNBits, QMoE and GatherBlockQuantized.

The packing is onnxruntime's own (`quantize_matmul_{2,4,8}bits`, the routines its `MatMulNBitsQuantizer` and
onnxruntime-genai's model builder call), so the bytes are exactly what its kernels read. The dequantized weight is
returned beside them: a PyTorch model holding it computes what the quantized graph computes (to fp32 rounding at
`accuracy_level` 0), which is how the fused graph's quantized variants are checked for layout mistakes that
perplexity would only hint at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnxruntime.capi._pybind_state import quantize_matmul_2bits, quantize_matmul_4bits, quantize_matmul_8bits

_PACKERS = {2: quantize_matmul_2bits, 4: quantize_matmul_4bits, 8: quantize_matmul_8bits}
BITS = tuple(_PACKERS)


@dataclass(frozen=True)
class BlockQuantized:
    """One weight matrix (N, K) quantized per block of `block_size` weights along K."""

    packed: np.ndarray  # (N, K / block, block * bits / 8) uint8, low bits first: MatMulNBits' B
    scales: np.ndarray  # (N, K / block) float32
    dequantized: torch.Tensor  # (N, K) float32: (q - 2^(bits-1)) * scale, what the kernels multiply by
    bits: int
    block_size: int

    @property
    def rows(self) -> np.ndarray:
        """(N, K * bits / 8): each output row's blocks flattened, as QMoE and GatherBlockQuantized read them."""
        return self.packed.reshape(self.packed.shape[0], -1)


def quantize_blockwise(weight: torch.Tensor, bits: int, block_size: int) -> BlockQuantized:
    """weight (N, K) in nn.Linear layout -> its symmetric `bits`-bit blocks (default zero point 2^(bits-1))."""
    if bits not in _PACKERS:
        raise ValueError(f"bits={bits} must be one of {BITS}")
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"the weight's input size {k} is not a multiple of block_size={block_size}")
    k_blocks = k // block_size
    packed = np.zeros((n, k_blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros(n * k_blocks, np.float32)
    zero_points = np.zeros(n * ((k_blocks * bits + 7) // 8), np.uint8)  # unused: symmetric
    matrix = np.ascontiguousarray(weight.detach().float().t().numpy())  # (K, N), as the packers take it
    _PACKERS[bits](packed, matrix, scales, zero_points, block_size, n, k, True)
    scales = scales.reshape(n, k_blocks)
    flat = packed.reshape(n, -1)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = ((flat[..., None] >> shifts) & ((1 << bits) - 1)).reshape(n, k)  # low bits first
    dequantized = (codes.astype(np.float32) - (1 << (bits - 1))) * np.repeat(scales, block_size, axis=1)
    return BlockQuantized(packed, scales, torch.from_numpy(dequantized), bits, block_size)
