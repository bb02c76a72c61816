import os
from pathlib import Path

import pytest
import torch

from tests.worker.moe_offload.tiny_moe import build_tiny_qwen3_next
from worker.engine.moe_offload.converter import convert_checkpoint

# The cache and equivalence tests run on this device: the CPU here and in CI; MOE_TEST_DEVICE=cuda on a
# machine with a GPU (benchmarks/gpu_check.sh) runs the same assertions through CUDA streams, events and page-locked rows.
TEST_DEVICE = torch.device(os.environ.get("MOE_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen3-Next saved as ~20 safetensors shards, with a tokenizer."""
    return build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-qwen3-next"))


@pytest.fixture(scope="session")
def converted(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint converted once per expert format: converted("nf4") -> folder."""
    root = tmp_path_factory.mktemp("converted")
    folders: dict[str, Path] = {}

    def get(quant: str) -> Path:
        if quant not in folders:
            folders[quant] = convert_checkpoint(
                tiny_checkpoint, root / quant, quant, host_memory_gb=0, show_progress=False
            )
        return folders[quant]

    return get
