"""The 4-bit expert matvec of `nf4_matvec.cpp`, built at first use: for AVX-512 VNNI where the host has it
(`torch.ops.moe_cpu_int4_avx512_vnni.nf4_matvec`), else for AVX2 (`torch.ops.moe_cpu_int4.nf4_matvec`)."""

from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from worker.engine.cpu_extension import AVX512_VNNI_FLAGS, build_cpu_extension, host_has_avx2, host_has_avx512_vnni

SOURCE = Path(__file__).with_name("nf4_matvec.cpp")
#: instruction set -> (torch op namespace, extra compiler flags)
BUILDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "AVX2": ("moe_cpu_int4", ()),
    "AVX-512 VNNI": ("moe_cpu_int4_avx512_vnni", AVX512_VNNI_FLAGS),
}


def host_isas() -> list[str]:
    """The builds this host can run, the fastest last."""
    if not host_has_avx2():
        return []
    return ["AVX2", "AVX-512 VNNI"] if host_has_avx512_vnni() else ["AVX2"]


@cache
def load_nf4_matvec(isa: str | None = None) -> Callable[..., torch.Tensor] | None:
    """The op of build `isa` (default: the host's fastest); None where the host or the build cannot give it
    (CPU experts then dequantize, then multiply)."""
    isas = host_isas()
    if isa is None and isas:
        isa = isas[-1]
    if isa not in isas:
        return None
    namespace, flags = BUILDS[isa]
    if not build_cpu_extension(namespace, SOURCE, (*flags, f"-DNF4_NAMESPACE={namespace}")):
        return None
    return getattr(torch.ops, namespace).nf4_matvec
