"""The block kernels (each build the host runs: AVX2, AVX-512 VNNI) against dequantize-then-multiply in torch.

Stated tolerance: the kernels quantize each activation block of 32 to int16 (32767 levels over its largest
magnitude), so against float32 dequantize-then-multiply of the same codes their output differs by at most
1e-4 of the output's scale (measured 2-5e-5). The codes themselves are exact: unpacking in C++ equals the
torch reference bit for bit, and packing weights that already sit on the grid gives the same codes back.
"""

import os
import time

import pytest
import torch

from tests.worker.cpu_quant.conftest import needs_avx2
from tests.worker.cpu_quant.reference import dequantize
from worker.engine.cpu_extension import STALE_LOCK_S, _remove_stale_lock, host_isas
from worker.engine.cpu_quant import kernels
from worker.engine.cpu_quant.linear import KERNEL_MAX_ROWS, QuantizedLinear
from worker.engine.cpu_quant.packing import pack

pytestmark = [needs_avx2, pytest.mark.usefixtures("built_kernels")]
ISAS = host_isas()  # each build this host runs: AVX2, and AVX-512 VNNI where it has it

# (rows of x, out_features, in_features): the bundled model's shapes, odd ones, one block, a partial block
SHAPES = [(1, 576, 576), (1, 1536, 576), (1, 576, 1536), (3, 7, 50), (1, 33, 100), (5, 16, 32), (2, 9, 17)]


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[0, : min(in_features, 32)] = 0.0  # a block of zeros: scale 0 must not divide by zero
    return weight


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _multiply(isa: str, x: torch.Tensor, packed) -> torch.Tensor:
    ops = kernels.load_build(isa)
    if packed.format == "q4":
        return ops.q4_linear(x, packed.codes, packed.scales, packed.minimums, packed.in_features)
    return ops.q8_linear(x, packed.codes, packed.scales, packed.in_features)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize(("rows", "out_features", "in_features"), SHAPES)
def test_the_kernel_equals_dequantize_then_multiply(isa, fmt, rows, out_features, in_features):
    packed = pack(_weight(out_features, in_features, seed=out_features + in_features), fmt)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    y = _multiply(isa, x, packed)
    expected = x @ dequantize(packed).T
    assert y.shape == (rows, out_features)
    assert _relative_error(y, expected) < 1e-4


@pytest.mark.skipif(len(ISAS) < 2, reason="the host runs one build only")
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_the_avx512_build_computes_what_the_avx2_build_does(fmt):
    """Same integer products, same scales: only the float sums' order differs."""
    packed = pack(_weight(300, 1000, seed=5), fmt)
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(6))
    assert _relative_error(_multiply("AVX-512 VNNI", x, packed), _multiply("AVX2", x, packed)) < 1e-6


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize(("out_features", "in_features"), [(40, 576), (9, 17), (3, 100)])
@pytest.mark.parametrize("isa", ISAS)
def test_unpacking_in_cpp_equals_the_reference_exactly(isa, fmt, out_features, in_features):
    packed = pack(_weight(out_features, in_features, seed=1), fmt)
    unpacked = kernels.load_build(isa).unpack(packed.codes, packed.scales, packed.minimums, in_features)
    assert torch.equal(unpacked, dequantize(packed))


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_packing_weights_already_on_the_grid_gives_the_same_codes(fmt):
    """A GGUF's Q4_1 / Q8_0 weights, converted to float, pack back to what they were: no second rounding."""
    first = pack(_weight(24, 96, seed=2), fmt)
    second = pack(dequantize(first), fmt)
    assert torch.equal(second.codes, first.codes)
    assert torch.equal(second.scales, first.scales)
    if fmt == "q4":
        assert torch.equal(second.minimums, first.minimums)


def test_q4_rounds_each_weight_to_its_nearest_level():
    weight = _weight(16, 64, seed=3)
    packed = pack(weight, "q4")
    step = packed.scales.float().repeat_interleave(32, dim=1)[:, :64]
    assert bool(((dequantize(packed) - weight).abs() <= step / 2 + 1e-3 * step + 1e-6).all())
    assert packed.nbytes == 16 * (64 // 2 + 2 * 2 * 2)  # codes, then a float16 scale and minimum per block


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 40])
def test_a_quantized_linear_replaces_nn_linear(fmt, rows):
    """Decode rows go through the kernel, a prefill's many rows through unpack + BLAS: both match."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(100, 48, bias=True)
    quantized = QuantizedLinear.from_linear(linear, fmt)
    x = torch.randn(1, rows, 100)
    expected = torch.nn.functional.linear(x, dequantize(quantized.packed()), linear.bias)
    y = quantized(x)
    assert y.shape == (1, rows, 48)
    assert _relative_error(y, expected) < 1e-4
    tolerance = 0.1 if fmt == "q4" else 0.02  # against the float layer: the weights' own rounding
    assert _relative_error(y, linear(x)) < tolerance


def test_a_bfloat16_input_comes_back_in_bfloat16():
    linear = torch.nn.Linear(64, 8, bias=False)
    y = QuantizedLinear.from_linear(linear, "q4")(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 8)


def test_a_build_lock_left_by_a_dead_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch waits on its build lock forever: a worker killed mid-build would hang every later start."""
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    for lock in (stale, fresh):
        lock.write_text("")
    old = time.time() - STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    _remove_stale_lock(stale)
    _remove_stale_lock(fresh)
    _remove_stale_lock(tmp_path / "absent")
    assert not stale.exists() and fresh.exists()
