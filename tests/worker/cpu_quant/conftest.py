import pytest

from worker.engine.cpu_extension import host_has_avx2
from worker.engine.cpu_quant import kernels

#: Skips only where the hardware lacks AVX2. Where it has it, the kernels must build: a compile error fails the
#: tests that need them (`built_kernels`) instead of turning them into skips while production falls back.
needs_avx2 = pytest.mark.skipif(not host_has_avx2(), reason="the int4 kernels need AVX2")


@pytest.fixture
def built_kernels() -> None:
    assert kernels.kernels_available(), "this host has AVX2, yet the int4 kernels did not build (see the log)"
