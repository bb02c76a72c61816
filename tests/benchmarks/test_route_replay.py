"""Routing recorded on a real (here: tiny) MoE checkpoint, replayed by the GPU benchmark in smoke mode."""

import numpy as np
import pytest

from benchmarks import moe_offload_gpu, record_routes
from benchmarks.route_file import RecordedRoutes
from benchmarks.routing_stats import routing_stats
from tests.worker.moe_offload.tiny_moe import build_tiny_qwen3_next


def test_routes_recorded_on_the_tiny_qwen3_next_are_what_the_smoke_benchmark_routes_to(tmp_path):
    checkpoint = build_tiny_qwen3_next(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world, tell me a story\nThe quick brown fox\n")
    routes_file = tmp_path / "routes.npz"
    recorded = record_routes.main(
        [str(checkpoint), "--device", "cpu", "--out", str(routes_file), "--tokens", "3", "--prompts", str(prompts)]
    )
    loaded = RecordedRoutes.load(routes_file)
    assert loaded.ids.shape == (recorded.tokens, 4, 4) and np.array_equal(loaded.ids, recorded.ids)
    assert loaded.experts == 32 and len(loaded.prompt_starts) == 2 and loaded.prompt_starts[0] == 0
    assert all(len(set(token_layer)) == 4 for token_layer in loaded.ids.reshape(-1, 4))  # distinct top-k ids

    tokens = 4
    report = moe_offload_gpu.main(
        [
            "--smoke",
            "--device",
            "cpu",
            "--tokens",
            str(tokens),
            "--routes",
            str(routes_file),
            "--variants",
            "lru",
            "--skip-naive",
            "--out",
            str(tmp_path / "replay.json"),
        ]
    )
    run = report["variants"][0]
    assert run["replay"] == {"tokens_checked": tokens - 1, "matched": True, "recorded_tokens": loaded.tokens}
    # independently: the warm-up (a 16-token prompt, 15 decode steps) and the prompt (16) came first
    start = 16 + 15 + 16
    rows = [(start + step) % loaded.tokens for step in range(tokens - 1)]
    per_layer = [[loaded.ids[row, layer].tolist() for row in rows] for layer in range(4)]
    assert run["routing"] == routing_stats(per_layer, report["slots_per_layer"]).as_dict()


def test_a_recording_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "routes.npz"
    RecordedRoutes(np.zeros((3, 2, 4), dtype=np.int64), experts=32).save(path)
    with pytest.raises(ValueError, match="2 MoE layers x 32 experts"):
        moe_offload_gpu.main(["--smoke", "--device", "cpu", "--routes", str(path), "--variants", "lru", "--skip-naive"])
