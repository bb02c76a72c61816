"""The GPU benchmark stays runnable between the rare sessions that have a GPU: its smoke mode on the CPU."""

import json

import pytest

from benchmarks import moe_offload_gpu


def test_gpu_benchmark_runs_end_to_end_in_smoke_mode_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    report = moe_offload_gpu.main(["--smoke", "--device", "cpu", "--tokens", "4", "--out", str(out)])
    assert json.loads(out.read_text())["smoke"] is True
    assert [run["label"] for run in report["variants"]] == [
        "offload lru + prefetch",
        "hybrid lru + prefetch",
        "offload lru",
        "offload lfu + prefetch",
    ]
    for run in report["variants"]:
        assert run["decode_tokens"] == 3 and run["tok_per_s"] > 0
        assert 0 < run["hit_rate"] < 1 and run["cache"]["misses"] > 0
        assert len(run["layer_ms"]) == 4
    assert report["complete"] is True and report["naive"]["tok_per_s"] > 0
    assert report["variants"][0]["cache"]["prefetched"] > 0
    assert report["variants"][2]["cache"]["prefetched"] == 0
    hybrid = report["variants"][1]["miss_split"]
    assert hybrid["mode"] == "hybrid" and hybrid["cpu_ms"] > 0 and 0 < hybrid["cpu_share"] < 1
    assert report["cpu_expert_ms"] == hybrid["cpu_ms"]
    assert report["naive"]["tok_per_s"] > 0 and report["h2d_gb_per_s"] > 0


@pytest.mark.slow
def test_gpu_benchmark_decodes_compiled_variants(tmp_path):
    report = moe_offload_gpu.main(
        [
            "--smoke",
            "--device",
            "cpu",
            "--tokens",
            "4",
            "--out",
            str(tmp_path / "c.json"),
            "--variants",
            "lru:compiled,no-experts:compiled,lru:compiled:graph",
            "--skip-naive",
        ]
    )
    offload, rest, graph = report["variants"]
    assert offload["label"] == "offload lru, compiled" and offload["compiled"] and offload["layer_ms"] is None
    assert offload["decode_tokens"] == 3 and offload["cache"]["misses"] > 0 and offload["expert_ms_per_token"] > 0
    assert offload["dynamo"]["graph_breaks"] > 0  # at every MoE layer
    assert rest["compiled"] and rest["cache"]["hits"] == rest["cache"]["misses"] == 0 and rest["tok_per_s"] > 0
    assert graph["label"] == "offload lru, graph decode, compiled" and graph["decode_tokens"] == 3
    assert graph["dynamo"]["graph_breaks"] == 0 and graph["cache"]["misses"] > 0  # one graph a step


@pytest.mark.slow
def test_an_emulated_bus_holds_the_engines_host_to_device_bytes_to_its_rate(tmp_path, capsys):
    """`:h2d=<GB/s>`: the variant's copies are paced; its row and JSON say "emulated", and the bandwidth it
    achieved, measured in the same run, stays within the rate (plus the one burst the bucket allows)."""
    rate = 0.5e6  # bytes a second: slower than this CPU's engine moves them unpaced, so the pacing binds
    report = moe_offload_gpu.main(
        ["--smoke", "--device", "cpu", "--tokens", "4", "--out", str(tmp_path / "e.json"), "--skip-naive"]
        + ["--variants", f"lru,lru:h2d={rate / 1e9:g}"]
    )
    free, emulated = report["variants"]
    assert free["emulated"] is None and "emulated" not in free["label"]
    assert emulated["label"] == "offload lru, emulated 0.0005 GB/s"
    paced = emulated["emulated"]
    burst = 4 * report["row_bytes"]  # one layer's top-k rows
    assert emulated["cache"]["bytes_over_bus"] > burst and paced["paced_wait_s"] > 0
    achieved = paced["achieved_h2d_gb_per_s"] * 1e9
    assert free["bus_gb_per_s"] * 1e9 > rate  # unpaced, the engine would go faster
    assert 0.5 * rate < achieved <= rate + burst / emulated["decode_seconds"]  # held to the rate
    assert emulated["bus_gb_per_s"] == paced["achieved_h2d_gb_per_s"]
    table_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| offload lru, emu"))
    assert table_row.endswith("emulated")
