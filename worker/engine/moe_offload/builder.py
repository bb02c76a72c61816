"""Build transformers' own model from a converted folder, with `OffloadedExperts` in place of each experts module."""

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from transformers.activations import ACT2FN

from worker.engine.moe_offload.budget import MemoryPlan
from worker.engine.moe_offload.checkpoint import build_skeleton, load_config
from worker.engine.moe_offload.converter import read_manifest
from worker.engine.moe_offload.cpu_experts import MissMode, MissSplit, calibrate_miss_split
from worker.engine.moe_offload.expert_cache import CachePolicyName, CacheStats, ExpertCache
from worker.engine.moe_offload.graph_decode import GraphDecode
from worker.engine.moe_offload.offloaded_experts import DecodeKernels, NextLayerPredictor, OffloadedExperts
from worker.engine.moe_offload.packing import ExpertLayout
from worker.engine.moe_offload.pinning import pin_in_place
from worker.engine.moe_offload.transfer import CopyStream

log = logging.getLogger(__name__)

ExpertKernel = Literal["auto", "triton", "torch"]
ExpertDecode = Literal["host", "graph"]


@dataclass
class OffloadedModel:
    model: torch.nn.Module
    caches: list[ExpertCache]
    plan: MemoryPlan
    miss_split: MissSplit

    def cache_stats(self) -> CacheStats:
        return CacheStats.total(cache.stats for cache in self.caches)


def load_host_rows(path: Path, pin: bool) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as reader:
        rows = reader.get_tensor("rows")  # a private map of the file: pages come in as they are read
    # Pinned (page-locked) memory is what lets host-to-device copies run asynchronously at full speed.
    return pin_in_place(torch.empty_like(rows).copy_(rows)) if pin else rows


def build_offloaded_model(folder: Path, device: torch.device, dtype: torch.dtype, plan: MemoryPlan,
                          policy: CachePolicyName = "lru", prefetch: bool = True,
                          misses: MissMode = "auto", kernel: ExpertKernel = "auto",
                          decode: ExpertDecode = "host") -> OffloadedModel:
    manifest = read_manifest(folder)
    config = load_config(folder)
    model = build_skeleton(config, dtype)
    pin = device.type == "cuda"
    experts = [(entry["module"], ExpertLayout.from_json(entry["layout"]), load_host_rows(folder / entry["file"], pin))
               for entry in manifest["experts"]]
    caches, split = install_offloaded_experts(model, experts, device, dtype, plan.slots_per_layer, policy, prefetch,
                                              config, misses, kernel, decode)
    _load_resident(model, folder, manifest["resident_files"], dtype)
    model.to(device).eval()
    log.info("Offloaded model ready: %d MoE layers, %d of %d expert slots per layer on %s; %s",
             len(caches), plan.slots_per_layer, caches[0].host_rows.shape[0], device, split.describe())
    return OffloadedModel(model, caches, plan, split)


def install_offloaded_experts(model: torch.nn.Module, experts: list[tuple[str, ExpertLayout, torch.Tensor]],
                              device: torch.device, dtype: torch.dtype, slots: int, policy: CachePolicyName,
                              prefetch: bool, config, misses: MissMode,
                              kernel: ExpertKernel = "auto", decode: ExpertDecode = "host",
                              refills: int | None = None) -> tuple[list[ExpertCache], MissSplit]:
    """Swap each (module name, layout, host rows) experts module for `OffloadedExperts` over a slot cache.
    With fewer slots than experts: with `prefetch`, link each layer to the next one's router, and decide
    (by `misses`, timed once here) what share of misses to compute on the CPU. `decode="graph"`: a compiled
    decode step keeps the experts on the device (`graph_decode`), refilling up to `refills` slots a layer a step
    (default top-k: every miss)."""
    copier = CopyStream(device)
    act_fn = ACT2FN[config.hidden_act]
    caches, modules = [], []
    kernels = fused_decode_kernels(kernel, experts[0][1], device, config.hidden_act,  # one layout per model
                                  config.num_experts_per_tok)
    for name, layout, host_rows in experts:
        cache = ExpertCache(host_rows, slots, device, copier, policy)
        module = OffloadedExperts(layout, cache, act_fn, dtype, kernels)
        model.set_submodule(name, module)
        caches.append(cache)
        modules.append(module)
    split = MissSplit("copy", 0.0)
    if slots < caches[0].host_rows.shape[0]:
        if prefetch:
            link_predictors(model, modules, config)
        layout, host_rows = experts[0][1], experts[0][2]
        split = calibrate_miss_split(misses, layout, host_rows, device, dtype, act_fn)
        for module in modules:
            module.miss_split = split
    if decode == "graph":
        top_k = config.num_experts_per_tok
        GraphDecode(modules, top_k, device, refills=top_k if refills is None else refills)
    return caches, split


def fused_decode_kernels(kernel: ExpertKernel, layout: ExpertLayout, device: torch.device, hidden_act: str,
                         top_k: int) -> DecodeKernels | None:
    """The Triton kernels for decode's experts (`triton_experts`), or None for the torch path. auto: on CUDA
    where Triton imports and the kernels cover the layout; triton: wherever asked (on the CPU that needs
    TRITON_INTERPRET=1, as the tests do), else an error; torch: never. On CUDA their block sizes are timed
    for `top_k` experts first."""
    if kernel == "torch" or (kernel == "auto" and device.type != "cuda"):
        return None
    try:
        from worker.engine.moe_offload import triton_experts
    except ImportError:
        if kernel == "triton":
            raise
        log.info("Triton is not installed: decode dequantizes experts, then multiplies")
        return None
    if not triton_experts.supports(layout, hidden_act):
        if kernel == "triton":
            raise ValueError(f"EXPERT_KERNEL=triton does not cover {layout} with activation {hidden_act}")
        return None
    try:  # auto takes them only once they have compiled, computed right and beaten the torch path here
        tuning = triton_experts.tune(layout, device, top_k) if device.type == "cuda" else None
        blocks = tuning.blocks if tuning else triton_experts.Blocks()
        error = triton_experts.check_against_torch(layout, device, blocks)
    except Exception:
        if kernel == "triton":
            raise
        log.warning("The Triton expert kernels failed their check here; decode dequantizes, then multiplies",
                    exc_info=True)
        return None
    if kernel == "auto" and tuning and tuning.fused_ms > tuning.torch_ms:
        log.info("Dequantize-then-multiply is faster here than the Triton expert kernels; decode uses it")
        return None
    log.info("Decode's experts: Triton kernels (relative difference to dequantize-then-multiply %.1e)", error)
    code = triton_experts.code_table(layout, device)
    return DecodeKernels(partial(triton_experts.fused_mix_decode, layout, code, blocks),
                         partial(triton_experts.fused_mix_decode_table, layout, code, blocks))


def link_predictors(model: torch.nn.Module, modules: list[OffloadedExperts], config) -> None:
    """Give each MoE layer the next one's router, so it can start the next layer's copies early."""
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    names = {id(m): n for n, m in model.named_modules()}
    for current, following in zip(modules, modules[1:], strict=False):
        parent_name = names[id(following)].rsplit(".", 1)[0]
        router = getattr(model.get_submodule(parent_name), "gate", None)
        if getattr(router, "weight", None) is None or top_k == 0:
            return  # a router this predictor does not know: no prefetch, nothing wrong
        current.next_layer = NextLayerPredictor(router, top_k, following.cache)


def _load_resident(model: torch.nn.Module, folder: Path, files: list[str], dtype: torch.dtype) -> None:
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for file_name in files:
        with safe_open(str(folder / file_name), framework="pt") as reader:
            state = {}
            for key in list(reader.keys()):
                tensor = reader.get_tensor(key)
                if tensor.is_floating_point() and not any(part in key for part in keep_fp32):
                    tensor = tensor.to(dtype)
                state[key] = tensor
        model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied lm_head / embeddings are stored once
    still_empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise RuntimeError(f"the converted model lacks weights for {still_empty[:5]} ({len(still_empty)} in all)")
