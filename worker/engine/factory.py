"""Pick and build the engine the settings ask for."""

import logging

import psutil

from shared.config import Settings
from worker.engine.base import Engine
from worker.engine.dedicated_thread import DedicatedThreadEngine
from worker.model_store import resolve_model_path

log = logging.getLogger(__name__)

_GIB = 1024**3


def create_engine(settings: Settings) -> Engine:
    from worker.engine.transformers_engine import TransformersEngine

    common = dict(model_path=resolve_model_path(settings), model_name=settings.model_id, device=settings.device,
                  dtype=settings.model_dtype, apply_chat_template=settings.apply_chat_template,
                  decode_compile=settings.decode_compile, max_model_len=settings.max_model_len,
                  compile_cache_dir=settings.compile_cache_dir or settings.model_cache_dir / "compile")
    if should_offload_experts(settings):
        from worker.engine.moe_offload.engine import MoEOffloadEngine, OffloadOptions

        options = OffloadOptions(
            converted_root=settings.model_cache_dir / "offload", quant=settings.expert_quant,
            gpu_memory_gb=settings.gpu_memory_gb, gpu_reserve_gb=settings.gpu_reserve_gb,
            host_memory_gb=settings.host_memory_gb, cache_policy=settings.expert_cache_policy,
            slots=settings.expert_slots, prefetch=settings.expert_prefetch, misses=settings.expert_misses,
            kernel=settings.expert_kernel, decode=settings.expert_decode,
        )
        return DedicatedThreadEngine(MoEOffloadEngine(options=options, **common))
    return DedicatedThreadEngine(TransformersEngine(**common))


def should_offload_experts(settings: Settings) -> bool:
    """OFFLOAD=auto: offload when the model is a fused-experts MoE whose 16-bit weights exceed the device
    budget (GPU_MEMORY_GB on a GPU, host RAM on the CPU, where 4-bit experts are what makes it fit)."""
    if settings.offload != "auto":
        return settings.offload == "experts"
    if settings.is_bundled_model:
        return False
    import torch

    from worker.engine.moe_offload.checkpoint import build_skeleton, find_fused_experts, load_config
    from worker.engine.transformers_engine import pick_device

    skeleton = build_skeleton(load_config(settings.model_id))
    if not find_fused_experts(skeleton):
        return False
    size_bytes = sum(p.numel() for p in skeleton.parameters()) * 2
    if pick_device(settings.device) == "cuda":
        budget = settings.gpu_memory_gb * _GIB or torch.cuda.get_device_properties(0).total_memory
    else:
        budget = settings.host_memory_gb * _GIB or psutil.virtual_memory().available
    log.info("%s: %.1f GB in 16-bit against a %.1f GB budget", settings.model_id, size_bytes / _GIB, budget / _GIB)
    return size_bytes > budget
