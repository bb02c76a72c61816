"""Which engine the worker's settings ask for, configured from them; the engines themselves know no settings."""

import logging

from worker.engine.base import Engine
from worker.engine.dedicated_thread import DedicatedThreadEngine
from worker.engine.moe_offload.config import OffloadConfig
from worker.settings import EngineSettings

log = logging.getLogger(__name__)

_GIB = 1024**3


def create_engine(model_path: str, settings: EngineSettings, offload: OffloadConfig) -> Engine:
    """The engine for the model at `model_path` (a folder or a Hugging Face id), not yet loaded."""
    from worker.engine.transformers_engine import TransformersEngine

    config = settings.engine_config(model_path)
    if should_offload_experts(settings, offload):
        from worker.engine.moe_offload.engine import MoEOffloadEngine

        return DedicatedThreadEngine(MoEOffloadEngine(config, offload, settings.converted_dir))
    return DedicatedThreadEngine(TransformersEngine(config))


def should_offload_experts(settings: EngineSettings, offload: OffloadConfig) -> bool:
    """OFFLOAD=auto, for a fused-experts MoE: on a GPU, when its 16-bit weights exceed GPU_MEMORY_GB; on the
    CPU always, where the offload engine's CPU tier (every expert 4-bit in RAM, computed in place) is what
    runs a MoE fast, whatever its size. Its host budget is checked when it loads."""
    if offload.offload != "auto":
        return offload.offload == "experts"
    if settings.is_bundled_model:
        return False
    import torch

    from worker.engine.moe_offload.checkpoint import build_skeleton, find_fused_experts, load_config
    from worker.engine.transformers_engine import pick_device

    skeleton = build_skeleton(load_config(settings.model_id))
    if not find_fused_experts(skeleton):
        return False
    if pick_device(settings.device) != "cuda":
        return True
    size_bytes = sum(p.numel() for p in skeleton.parameters()) * 2
    budget = offload.gpu_memory_gb * _GIB or torch.cuda.get_device_properties(0).total_memory
    log.info("%s: %.1f GB in 16-bit against a %.1f GB budget", settings.model_id, size_bytes / _GIB, budget / _GIB)
    return size_bytes > budget
