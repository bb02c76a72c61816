"""Builds (once per machine, then cached on disk) and loads the project's AVX2 C++ kernels for the CPU.

Each source registers its ops under a torch library namespace (`torch.ops.<name>`). It is compiled at first
use with the host's C++ compiler into torch's extensions folder (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions), so a later process only loads it. Without AVX2, a compiler or a working build,
`build_cpu_extension` says False and callers keep their plain torch path.
"""

import logging
import platform
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# -fopenmp: at::parallel_for is inline OpenMP. F16C comes with every AVX2 CPU.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]


def host_has_avx2() -> bool:
    """AVX2 and FMA, as torch's own CPU dispatch sees them (AVX512 hosts have both)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@cache
def build_cpu_extension(name: str, source: Path) -> bool:
    """Build or load `source` as extension `name`, once per process; False where the host or build can't."""
    if not host_has_avx2():
        log.info("No AVX2 here: %s is not built", name)
        return False
    try:
        from torch.utils import cpp_extension

        log.info("Loading the CPU kernels %s (built once per machine: about 20 s)", name)
        cpp_extension.load(
            name, sources=[str(source)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False
        )
    except Exception:
        log.warning("The CPU kernels %s did not build; the plain torch path stays", name, exc_info=True)
        return False
    return True
