"""Builds (once per machine, then cached on disk) and loads the AVX2 4-bit matvec of `nf4_matvec.cpp`.

The extension registers `torch.ops.moe_cpu_int4.nf4_matvec`. It is compiled at first use with the host's
C++ compiler into torch's extensions folder (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), so a
later process only loads it. Without AVX2, a compiler or a working build, `load_nf4_matvec` returns None and
callers keep dequantize-then-multiply.
"""

import logging
import platform
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nf4_matvec.cpp")
_NAME = "moe_cpu_int4"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17"]  # -fopenmp: at::parallel_for is inline OpenMP


def host_has_avx2() -> bool:
    """AVX2 and FMA, as torch's own CPU dispatch sees them (AVX512 hosts have both)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@cache
def load_nf4_matvec() -> Callable[..., torch.Tensor] | None:
    """The op, built or loaded once per process; None where the host or the build cannot give it."""
    if not host_has_avx2():
        log.info("No AVX2 here: CPU experts dequantize, then multiply")
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            _NAME, sources=[str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False
        )
    except Exception:
        log.warning("The 4-bit CPU expert kernel did not build; CPU experts dequantize, then multiply", exc_info=True)
        return None
    return torch.ops.moe_cpu_int4.nf4_matvec
