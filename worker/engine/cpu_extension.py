"""Builds (once per machine, then cached on disk) and loads the project's C++ kernels for the CPU (AVX2, AVX-512).

Each source registers its ops under a torch library namespace (`torch.ops.<name>`). It is compiled at first
use with the host's C++ compiler into torch's extensions folder (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions), so a later process only loads it. Without AVX2, a compiler or a working build,
`build_cpu_extension` says False and callers keep their plain torch path.
"""

import logging
import platform
import time
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# -fopenmp: at::parallel_for is inline OpenMP. F16C comes with every AVX2 CPU.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]
#: A build lock older than this was left by a process that died while building (torch would wait on it forever).
STALE_LOCK_S = 600
#: instruction set -> the compiler flags beyond the AVX2 ones that a build for it adds
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX2": (),
    "AVX-512 VNNI": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
}
_AVX512_VNNI_CPUINFO = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def host_has_avx2() -> bool:
    """AVX2 and FMA, as torch's own CPU dispatch sees them (AVX512 hosts have both)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@cache
def host_cpu_flags() -> frozenset[str]:
    """The CPU's flags as Linux lists them in /proc/cpuinfo (none where it cannot be read)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return next(
        (frozenset(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")),
        frozenset(),
    )


@cache
def host_has_avx512_vnni() -> bool:
    """AVX-512 with VNNI (Intel since Cascade Lake, AMD since Zen 4), as Linux lists the CPU's flags."""
    return host_has_avx2() and host_cpu_flags() >= frozenset(_AVX512_VNNI_CPUINFO)


def host_isas() -> list[str]:
    """The instruction sets the kernels can be built for on this host, the fastest last."""
    if not host_has_avx2():
        return []
    return ["AVX2", "AVX-512 VNNI"] if host_has_avx512_vnni() else ["AVX2"]


def build_for_isa(isa: str, namespace: str, source: Path, namespace_macro: str) -> bool:
    """Build `source` for `isa` with its ops registered under `namespace` (the source takes it from the
    `namespace_macro` define), so that the builds of one source for several ISAs load side by side."""
    return build_cpu_extension(namespace, source, (*_ISA_FLAGS[isa], f"-D{namespace_macro}={namespace}"))


@cache
def build_cpu_extension(name: str, source: Path, extra_flags: tuple[str, ...] = ()) -> bool:
    """Build or load `source` as extension `name` (a name per set of flags: each is cached apart), once per
    process; False where the host or build can't."""
    if not host_has_avx2():
        log.info("No AVX2 here: %s is not built", name)
        return False
    try:
        from torch.utils import cpp_extension

        _remove_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock")
        log.info("Loading the CPU kernels %s (built once per machine: about 20 s)", name)
        cpp_extension.load(
            name,
            sources=[str(source)],
            extra_cflags=_FLAGS + list(extra_flags),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception:
        log.warning("The CPU kernels %s did not build; the plain torch path stays", name, exc_info=True)
        return False
    return True


def _remove_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("Removing %s, left %.0f s ago by a build that did not finish", lock, age)
        lock.unlink(missing_ok=True)
    else:
        log.info("Another process is building %s; waiting for it", lock.parent.name)
