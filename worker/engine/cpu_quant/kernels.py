"""The kernels of `linear_kernels.cpp` as torch ops (`q4_linear`, `q8_linear`, `unpack`).

Built at first use (about 20 s, once per machine and instruction set): for AVX-512 VNNI where the host has
it, else for AVX2. Each build registers its ops under a namespace of its own (`torch.ops.cpu_quant_avx2`,
`torch.ops.cpu_quant_avx512_vnni`), and each op gets a fake implementation too, so that `torch.compile`
traces through a quantized layer as one opaque call instead of breaking the graph there.
"""

from functools import cache
from pathlib import Path
from typing import Any

import torch

from worker.engine.cpu_extension import build_for_isa, host_isas

SOURCE = Path(__file__).with_name("linear_kernels.cpp")
BLOCK = 32  # weights per scale (and minimum): both formats, and the activation's quantization block

#: instruction set -> the torch op namespace of its build
NAMESPACES = {"AVX2": "cpu_quant_avx2", "AVX-512 VNNI": "cpu_quant_avx512_vnni"}

_active: Any = None  # the namespace of the build the layers call, once `kernels_available()` said True


def kernels_isa() -> str | None:
    """The build the layers use here."""
    isas = host_isas()
    return isas[-1] if isas else None


@cache
def load_build(isa: str) -> Any | None:
    """The ops of one build (`torch.ops.<namespace>`), built or loaded once; None where it cannot build."""
    namespace = NAMESPACES[isa]
    if not build_for_isa(isa, namespace, SOURCE, "CPU_QUANT_NAMESPACE"):
        return None
    for name in ("q4_linear", "q8_linear"):
        torch.library.register_fake(f"{namespace}::{name}")(_fake_linear)
    torch.library.register_fake(f"{namespace}::unpack")(_fake_unpack)
    return getattr(torch.ops, namespace)


@cache
def kernels_available() -> bool:
    """True once the layers' build is loaded; False where the host can't build it."""
    global _active
    isa = kernels_isa()
    _active = load_build(isa) if isa is not None else None
    return _active is not None


def _fake_linear(x: torch.Tensor, codes: torch.Tensor, *rest: object) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def _fake_unpack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor | None, K: int) -> torch.Tensor:
    return scales.new_empty(codes.shape[0], K, dtype=torch.float32)


def q4_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, in_features: int
) -> torch.Tensor:
    return _active.q4_linear(x, codes, scales, minimums, in_features)


def q8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    return _active.q8_linear(x, codes, scales, in_features)


def unpack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """The float32 weight (q4 when `minimums` is given, else q8)."""
    return _active.unpack(codes, scales, minimums, in_features)
