"""The AVX2 4-bit expert matvec of `nf4_matvec.cpp` (`torch.ops.moe_cpu_int4.nf4_matvec`), built at first use."""

from collections.abc import Callable
from pathlib import Path

import torch

from worker.engine.cpu_extension import build_cpu_extension

SOURCE = Path(__file__).with_name("nf4_matvec.cpp")


def load_nf4_matvec() -> Callable[..., torch.Tensor] | None:
    """The op; None where the host or the build cannot give it (CPU experts then dequantize, then multiply)."""
    if not build_cpu_extension("moe_cpu_int4", SOURCE):
        return None
    return torch.ops.moe_cpu_int4.nf4_matvec
