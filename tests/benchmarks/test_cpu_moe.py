"""The CPU MoE benchmark: its arithmetic (per layer from two depths, bandwidth floors, ratios to the peer),
and one smoke run of the real thing at tiny shapes."""

import json

import pytest

from benchmarks import cpu_moe
from benchmarks.model_shapes import SMOKE_SHAPES
from worker.engine.cpu_extension import host_has_avx2


def _row(decode_ms: float, prefill_tok_per_s: float, read_bytes: dict | None = None) -> dict:
    row = {
        "decode_ms": {"median": decode_ms, "min": decode_ms, "max": decode_ms, "n": 1},
        "prefill_tok_per_s": {"median": prefill_tok_per_s},
        "peak_rss_gb": 1.0,
    }
    return row | ({"read_bytes": read_bytes} if read_bytes else {})


def test_per_layer_figures_come_from_the_difference_between_two_depths():
    read = {"linear_attention": 4_000_000, "full_attention": 8_000_000}  # mean over 4 layers: 5 MB
    by_depth = {
        4: {"ours": _row(20.0, 100.0, read), "llama.cpp": _row(30.0, 50.0)},
        8: {"ours": _row(28.0, 50.0, read), "llama.cpp": _row(46.0, 25.0)},
    }
    result = cpu_moe.report(by_depth, SMOKE_SHAPES, bandwidth=10.0)
    ours, peer = result["variants"]["ours"], result["variants"]["llama.cpp"]
    assert ours["decode_ms_per_layer"] == pytest.approx(2.0)
    assert peer["decode_ms_per_layer"] == pytest.approx(4.0)
    assert result["decode_layer_speedup_vs_best_peer"] == pytest.approx(2.0)
    # prefill: 1/50 - 1/100 s per token over 4 layers = 2.5 ms per token-layer; the peer's 5
    assert ours["prefill_ms_per_token_layer"] == pytest.approx(2.5)
    assert result["prefill_ratio_vs_best_peer"] == pytest.approx(2.0)
    assert ours["floor_ms_per_layer"] == pytest.approx(5e6 / 10e9 * 1000)  # 0.5 ms
    assert result["decode_share_of_bandwidth_floor"] == pytest.approx(0.25)
    # full depth: the fixed part (20 - 4 * 2 = 12 ms), then every layer of the model at 2 ms
    full = 12.0 + SMOKE_SHAPES["num_hidden_layers"] * 2
    assert ours["full_depth_decode_ms_extrapolated"] == pytest.approx(full)
    # a desktop with 6x this bandwidth, at the same share of its floor: 6x faster (a labelled estimate)
    desktop = cpu_moe.report(by_depth, SMOKE_SHAPES, bandwidth=10.0, desktop_gbps=60.0)["variants"]["ours"]
    assert desktop["desktop_full_depth_decode_ms_estimated"] == pytest.approx(full / 6)


def test_the_peer_reads_the_layers_tensors_and_top_k_of_its_experts():
    per_type = cpu_moe.peer_read_bytes(SMOKE_SHAPES)
    assert set(per_type) == {"linear_attention", "full_attention"}
    shapes = SMOKE_SHAPES
    all_experts = 3 * shapes["num_experts"] * shapes["hidden_size"] * shapes["moe_intermediate_size"]
    # the top-k experts' 4.5-bit weights are part of it, all of the experts' are not
    top_k_bytes = all_experts * 4.5 / 8 * shapes["num_experts_per_tok"] / shapes["num_experts"]
    assert top_k_bytes < per_type["full_attention"] < all_experts * 4.5 / 8


@pytest.mark.slow
@pytest.mark.skipif(not host_has_avx2(), reason="the fast variant needs the AVX2 kernels")
def test_a_smoke_run_measures_both_depths_and_writes_the_json(tmp_path):
    out = tmp_path / "cpu_moe.json"
    result = cpu_moe.main(
        ["--smoke", "--layers", "4,8", "--variants", "today,ours", "--tokens", "3", "--prompt", "8"]
        + ["--rounds", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    ours = result["variants"]["ours"]
    assert set(ours["by_depth"]) == {4, 8} and ours["by_depth"][8]["decode_ms"]["n"] == 1
    assert "decode_ms_per_layer" in ours and result["decode_share_of_bandwidth_floor"] is not None
    assert set(result["variants"]["today"]["by_depth"]) == {4}  # the baseline at the smallest depth only
