"""The AVX2 kernels of `linear_kernels.cpp` as torch ops (`torch.ops.cpu_quant.q4_linear`, `q8_linear`).

Built at first use (about 20 s, once per machine). Each op gets a fake implementation too, so that
`torch.compile` traces through a quantized layer as one opaque call instead of breaking the graph there.
"""

from functools import cache
from pathlib import Path

import torch

from worker.engine.cpu_extension import build_cpu_extension

SOURCE = Path(__file__).with_name("linear_kernels.cpp")
BLOCK = 32  # weights per scale (and minimum): both formats, and the activation's quantization block


@cache
def kernels_available() -> bool:
    """True once the ops are loaded (and their fakes registered); False where the host can't build them."""
    if not build_cpu_extension("cpu_quant", SOURCE):
        return False
    for name in ("q4_linear", "q8_linear"):
        torch.library.register_fake(f"cpu_quant::{name}")(_fake_linear)
    torch.library.register_fake("cpu_quant::unpack")(_fake_unpack)
    return True


def _fake_linear(x: torch.Tensor, codes: torch.Tensor, *rest: object) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def _fake_unpack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor | None, K: int) -> torch.Tensor:
    return scales.new_empty(codes.shape[0], K, dtype=torch.float32)


def q4_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, in_features: int
) -> torch.Tensor:
    return torch.ops.cpu_quant.q4_linear(x, codes, scales, minimums, in_features)


def q8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    return torch.ops.cpu_quant.q8_linear(x, codes, scales, in_features)


def unpack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """The float32 weight (q4 when `minimums` is given, else q8)."""
    return torch.ops.cpu_quant.unpack(codes, scales, minimums, in_features)
