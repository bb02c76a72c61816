import torch
from torch._dynamo.mutation_guard import GenerationTracker

from worker.engine.compiled_decode import decode_graph


def _mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x @ weight).sum(dim=0)


def test_a_graph_run_in_the_decode_steps_gap_computes_the_same_and_keeps_the_graph_trees_generation():
    """Entering a `torch.compile`d function starts a new generation of the CUDA graph tree, which frees the
    outputs of the step's graphs before the gap while the gap still reads them (seen on an H100)."""
    x, weight = torch.randn(3, 8), torch.randn(8, 4)
    assert decode_graph(_mix, compiled=False) is _mix
    graph = decode_graph(_mix, compiled=True)
    for _ in range(2):  # the first call compiles, the second replays
        generation = GenerationTracker.generation
        torch.testing.assert_close(graph(x, weight), _mix(x, weight))
        assert GenerationTracker.generation == generation
    plain = torch.compile(_mix, dynamic=False, fullgraph=True)
    generation = GenerationTracker.generation
    plain(x, weight)
    assert GenerationTracker.generation != generation  # what the gap's graphs must not do
