"""The 4-bit expert matvec of `nf4_matvec.cpp`, built at first use: for AVX-512 VNNI where the host has it
(`torch.ops.moe_cpu_int4_avx512_vnni.nf4_matvec`), else for AVX2 (`torch.ops.moe_cpu_int4.nf4_matvec`). The op
has a fake implementation too, so that `torch.compile` traces a decode step through it as one opaque call."""

from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from worker.engine.cpu_extension import build_for_isa, host_isas

SOURCE = Path(__file__).with_name("nf4_matvec.cpp")
#: instruction set -> the torch op namespace of its build
NAMESPACES = {"AVX2": "moe_cpu_int4", "AVX-512 VNNI": "moe_cpu_int4_avx512_vnni"}


@cache
def load_nf4_matvec(isa: str | None = None) -> Callable[..., torch.Tensor] | None:
    """The op of build `isa` (default: the host's fastest); None where the host or the build cannot give it
    (CPU experts then dequantize, then multiply)."""
    isas = host_isas()
    if isa is None and isas:
        isa = isas[-1]
    if isa not in isas:
        return None
    namespace = NAMESPACES[isa]
    if not build_for_isa(isa, namespace, SOURCE, "NF4_NAMESPACE"):
        return None
    torch.library.register_fake(f"{namespace}::nf4_matvec")(_fake_nf4_matvec)
    return getattr(torch.ops, namespace).nf4_matvec


def _fake_nf4_matvec(x: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, lut: torch.Tensor, *rest) -> torch.Tensor:
    n = rest[2]  # packed_offset, absmax_offset, N, K
    return x.new_empty(ids.shape[0], n)
