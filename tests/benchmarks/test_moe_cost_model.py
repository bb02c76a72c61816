"""The cost model: predictions follow hit rate and bandwidth, and a calibration gives its run back."""

import json
from dataclasses import replace

import pytest

from benchmarks import moe_cost_model


def test_cost_model_predictions_follow_hit_rate_and_bandwidth():
    base = moe_cost_model.Inputs()
    assert base.slots == int(base.uniform_hit_rate * moe_cost_model.EXPERTS) > moe_cost_model.TOP_K
    assert moe_cost_model.tok_per_s(base, 0.8) > moe_cost_model.tok_per_s(base, 0.2)
    faster_bus = moe_cost_model.Inputs(pcie_gb_per_s=50.0)
    assert moe_cost_model.tok_per_s(faster_bus, 0.2) > moe_cost_model.tok_per_s(base, 0.2)
    # the bus-bound ceiling with no cache and free compute: 1 / (L * k * copy time)
    free_compute = moe_cost_model.Inputs(gpu_expert_ms=0.0, dense_ms=0.0, layer_host_ms=0.0)
    ceiling = 1000 / (moe_cost_model.LAYERS * moe_cost_model.TOP_K * free_compute.copy_ms)
    assert moe_cost_model.tok_per_s(free_compute, 0.0) == pytest.approx(ceiling)


def test_cost_model_graph_decode_gathers_the_misses_then_computes_and_the_bus_bounds_the_step():
    base = moe_cost_model.Inputs(graph_dense_ms=0.0, zero_copy_share=0.4)  # a gather slower than the refills
    layers, top_k, row = moe_cost_model.LAYERS, moe_cost_model.TOP_K, moe_cost_model.ROW_BYTES
    assert moe_cost_model.graph_tok_per_s(base, 0.8) > moe_cost_model.graph_tok_per_s(base, 0.2)
    # every expert a hit: the kernels alone
    kernels_ms = layers * top_k * base.kernel_expert_ms
    assert moe_cost_model.graph_tok_per_s(base, 1.0) == pytest.approx(1000 / kernels_ms)
    # every expert a miss: gathered at the zero-copy share of the bus, then computed
    gather_ms = layers * top_k * row / (base.zero_copy_share * base.pcie_gb_per_s * 1e9) * 1000
    assert moe_cost_model.graph_tok_per_s(base, 0.0) == pytest.approx(1000 / (gather_ms + kernels_ms))
    # a gather as fast as the bus and free compute: the refills' copies make the bus carry each miss twice
    bus_bound = moe_cost_model.Inputs(graph_dense_ms=0.0, zero_copy_share=1.0, kernel_expert_ms=0.0)
    bus_ms = 2 * layers * top_k * row / (base.pcie_gb_per_s * 1e9) * 1000
    assert moe_cost_model.graph_tok_per_s(bus_bound, 0.0) == pytest.approx(1000 / bus_ms)


def test_cost_model_fits_the_dense_part_of_a_one_graph_step_on_a_graph_run():
    run = {
        "label": "offload lru, triton, graph decode, compiled",
        "expert_kernel": "triton",
        "tok_per_s": 31.2,
        "expert_ms_per_token": 0.0,
        "hit_rate": 0.514,
    }
    report = {
        "resident_gb": 4.41,
        "h2d_gb_per_s": 55.2,
        "expert_compute_ms": 0.045,
        "fused_expert_compute_ms": 0.009,
        "cpu_expert_ms": None,
        "variants": [run],
    }
    inputs = moe_cost_model.inputs_from_measurement(report, budget_gb=16, zero_copy_share=0.715)
    assert 0 < inputs.graph_dense_ms < 1000 / 31.2  # the step less its modelled experts
    assert inputs.dense_ms == inputs.graph_dense_ms  # no host-path run: the graph's stands in
    predicted = moe_cost_model.graph_tok_per_s(replace(inputs, pcie_gb_per_s=55.2), run["hit_rate"])
    assert predicted == pytest.approx(31.2)  # the run comes back
    assert moe_cost_model.graph_tok_per_s(replace(inputs, pcie_gb_per_s=25.0), run["hit_rate"]) < predicted


def test_cost_model_refuses_a_smoke_measurement(tmp_path):
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"smoke": True}))
    with pytest.raises(SystemExit):
        moe_cost_model.main(["--measured", str(smoke)])


def test_cost_model_calibrated_on_a_run_reproduces_it():
    run = {"tok_per_s": 7.0, "expert_ms_per_token": 40.0, "hit_rate": 0.85}
    report = {
        "resident_gb": 4.41,
        "h2d_gb_per_s": 55.0,
        "expert_compute_ms": 0.03,
        "cpu_expert_ms": 5.0,
        "variants": [run, {"tok_per_s": 13.0, "expert_ms_per_token": 1.0, "hit_rate": 0.0}],
    }
    inputs = moe_cost_model.inputs_from_measurement(report, budget_gb=16)
    assert inputs.dense_ms == pytest.approx(1000 / 13.0 - 1.0)  # the least over the variants
    assert inputs.layer_host_ms > 0
    # dense part from the fastest variant, host time per layer from the experts' share: the run comes back
    predicted = moe_cost_model.tok_per_s(inputs, run["hit_rate"])
    assert predicted == pytest.approx(1000 / (inputs.dense_ms + run["expert_ms_per_token"]))


def test_cost_model_times_each_run_by_the_expert_path_it_took():
    report = {
        "resident_gb": 4.41,
        "h2d_gb_per_s": 55.0,
        "expert_compute_ms": 0.19,
        "fused_expert_compute_ms": 0.024,
        "cpu_expert_ms": None,
        "variants": [
            {
                "label": "offload lru + prefetch, triton, compiled",
                "expert_kernel": "triton",
                "tok_per_s": 10.3,
                "expert_ms_per_token": 52.8,
                "hit_rate": 0.85,
            },
            {
                "label": "offload lru, graph decode, compiled",
                "expert_kernel": "triton",
                "tok_per_s": 30.0,
                "expert_ms_per_token": 0.0,
                "hit_rate": 0.5,
            },
        ],
    }
    inputs = moe_cost_model.inputs_from_measurement(report, budget_gb=16)
    assert inputs.dense_ms == pytest.approx(1000 / 10.3 - 52.8)  # not the graph run's whole step
    assert inputs.graph_dense_ms < 1000 / 30.0  # the graph run's, its modelled experts taken out
    assert inputs.gpu_expert_ms == 0.024  # the kernels the host-path run used, not dequantize-then-multiply
    assert inputs.layer_host_ms > 0  # calibrated on the host-path run; the graph run's experts are not timed
    predicted = moe_cost_model.tok_per_s(replace(inputs, pcie_gb_per_s=55.0), 0.85)
    assert predicted == pytest.approx(10.3, rel=0.02)  # the run comes back
