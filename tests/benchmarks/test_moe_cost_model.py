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


def test_cost_model_graph_decode_gathers_the_misses_computes_then_refills_on_the_device():
    base = moe_cost_model.Inputs(graph_dense_ms=0.0, zero_copy_share=0.4)
    layers, top_k, row = moe_cost_model.LAYERS, moe_cost_model.TOP_K, moe_cost_model.ROW_BYTES
    assert moe_cost_model.graph_tok_per_s(base, 0.8) > moe_cost_model.graph_tok_per_s(base, 0.2)
    # every expert a hit: the kernels alone, nothing to refill
    kernels_ms = layers * top_k * base.kernel_expert_ms
    assert moe_cost_model.graph_tok_per_s(base, 1.0) == pytest.approx(1000 / kernels_ms)
    # every expert a miss: gathered at the zero-copy share of the bus, computed, then each copied into a slot
    # on the device (its own term, at the device's copy bandwidth, not the bus's)
    gather_ms = layers * top_k * row / (base.zero_copy_share * base.pcie_gb_per_s * 1e9) * 1000
    refill_ms = layers * top_k * row / (base.d2d_gb_per_s * 1e9) * 1000
    assert moe_cost_model.refill_ms(base, 0.0) == pytest.approx(refill_ms)
    assert moe_cost_model.graph_tok_per_s(base, 0.0) == pytest.approx(1000 / (gather_ms + kernels_ms + refill_ms))
    no_refills = replace(base, refill_share=0.0)
    assert moe_cost_model.graph_tok_per_s(no_refills, 0.0) == pytest.approx(1000 / (gather_ms + kernels_ms))
    # the bus carries each miss once
    assert moe_cost_model.bus_bytes_per_token(0.5) == pytest.approx(layers * top_k * 0.5 * row)


def test_cost_model_predicts_an_emulated_run_from_its_bandwidth_and_fits_its_dense_part_without_the_wait():
    on_card = moe_cost_model.Inputs(pcie_gb_per_s=55.0, graph_dense_ms=20.0)
    unthrottled = moe_cost_model.graph_tok_per_s(on_card, 0.5)
    at_25, at_12 = (moe_cost_model.emulated_graph_tok_per_s(on_card, 0.5, gbps) for gbps in (25.0, 12.5))
    wait_25 = moe_cost_model.bus_bytes_per_token(0.5) / 25e9 * 1000
    assert 1000 / at_25 == pytest.approx(1000 / unthrottled + wait_25) and at_12 < at_25 < unthrottled
    # a measured emulated run: the fitted dense part leaves the pacing's wait and the refills out, and the
    # run comes back
    run = {
        "label": "offload lru, triton, graph decode, emulated 25 GB/s, compiled",
        "tok_per_s": at_25,
        "hit_rate": 0.5,
        "decode_tokens": 10,
        "cache": {"bytes_copied_on_device": 10 * int(moe_cost_model.bus_bytes_per_token(0.5))},
        "emulated": {"h2d_gbps": 25.0},
    }
    report = {
        "resident_gb": 4.41,
        "h2d_gb_per_s": 55.0,
        "d2d_gb_per_s": on_card.d2d_gb_per_s,
        "expert_compute_ms": 0.045,
        "fused_expert_compute_ms": on_card.kernel_expert_ms,
        "cpu_expert_ms": None,
        "variants": [run],
    }
    fitted = moe_cost_model.inputs_from_measurement(report, budget_gb=16, zero_copy_share=on_card.zero_copy_share)
    assert fitted.graph_dense_ms == pytest.approx(20.0)
    assert moe_cost_model.predict_run(replace(fitted, pcie_gb_per_s=55.0), run) == pytest.approx(at_25)


def test_cost_model_run_plainly_fits_on_the_newest_result(tmp_path):
    older, newer = tmp_path / "h200-2026-11-20", tmp_path / "h100-2026-11-26"
    older.mkdir(), newer.mkdir()
    undated = tmp_path / "moe_offload_gpu-NVIDIA_H200.json"
    undated.write_text(json.dumps({"smoke": False}))
    (older / "1-moe_offload_gpu.json").write_text(json.dumps({"smoke": False}))
    (newer / "3c-moe_offload_gpu.json").write_text(json.dumps({"smoke": False}))
    (newer / "3c-moe_offload_gpu-fla.json").write_text(json.dumps({"smoke": False}))
    (tmp_path / "smoke.json").write_text(json.dumps({"smoke": True, "date": "2030-01-01"}))
    assert moe_cost_model.newest_result(tmp_path) == newer / "3c-moe_offload_gpu.json"
    dated = tmp_path / "moe_offload_gpu-NVIDIA_RTX.json"  # the benchmark now writes its date into the JSON
    dated.write_text(json.dumps({"smoke": False, "date": "2026-12-01T10:00:00"}))
    assert moe_cost_model.newest_result(tmp_path) == dated
    # in this repository: the H100 run, not the older H200 file
    assert "h100" in str(moe_cost_model.newest_result()).lower()


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
    # a run from before device-to-device refills (its refills crossed the bus beside the step): it comes back
    # without the refill term, and today's refills on the device cost their own time on top
    as_run = replace(inputs, pcie_gb_per_s=55.2, refill_share=0.0)
    predicted = moe_cost_model.graph_tok_per_s(as_run, run["hit_rate"])
    assert predicted == pytest.approx(31.2)
    today = moe_cost_model.graph_tok_per_s(replace(as_run, refill_share=1.0), run["hit_rate"])
    assert 1000 / today == pytest.approx(1000 / 31.2 + moe_cost_model.refill_ms(inputs, run["hit_rate"]))
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
