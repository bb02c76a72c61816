"""Build transformers' own model from a converted folder, with `OffloadedExperts` in place of each experts module."""

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.activations import ACT2FN

from shared.schemas import ExpertCacheCounters
from worker.engine.moe_offload.budget import MemoryPlan
from worker.engine.moe_offload.checkpoint import build_skeleton, load_config
from worker.engine.moe_offload.config import ExpertKernel, OffloadConfig
from worker.engine.moe_offload.converter import read_manifest
from worker.engine.moe_offload.cpu_experts import MissSplit, calibrate_miss_split
from worker.engine.moe_offload.expert_cache import ExpertCache
from worker.engine.moe_offload.graph_decode import GraphDecode
from worker.engine.moe_offload.offloaded_experts import DecodeKernels, NextLayerPredictor, OffloadedExperts
from worker.engine.moe_offload.packing import ExpertLayout
from worker.engine.moe_offload.pinning import pin_in_place
from worker.engine.moe_offload.transfer import CopyStream

log = logging.getLogger(__name__)


@dataclass
class OffloadedExpertLayers:
    """Every `OffloadedExperts` of one model, what they share, and the `DecodeHooks` a compiled decode drives."""

    modules: list[OffloadedExperts]
    miss_split: MissSplit
    graph_decode: GraphDecode | None = None

    @property
    def caches(self) -> list[ExpertCache]:
        return [module.cache for module in self.modules]

    def cache_stats(self) -> ExpertCacheCounters:
        return ExpertCacheCounters.total(cache.stats for cache in self.caches)

    def compile_decode(self, compiled: bool) -> None:
        """Each layer's decode math (and its next-layer guess) as graphs of their own; False: eager again."""
        for module in self.modules:
            module.compile_decode(compiled)

    def between_decode_steps(self) -> None:
        if self.graph_decode is not None:
            self.graph_decode.between_steps()


@dataclass
class OffloadedModel:
    model: torch.nn.Module
    experts: OffloadedExpertLayers
    plan: MemoryPlan


def load_host_rows(path: Path, pin: bool) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as reader:
        rows = reader.get_tensor("rows")  # a private map of the file: pages come in as they are read
    # Pinned (page-locked) memory is what lets host-to-device copies run asynchronously at full speed.
    return pin_in_place(torch.empty_like(rows).copy_(rows)) if pin else rows


def build_offloaded_model(
    folder: Path, device: torch.device, dtype: torch.dtype, plan: MemoryPlan, config: OffloadConfig
) -> OffloadedModel:
    """`config.decode` as resolved: graph or host (auto is the engine's to decide)."""
    manifest = read_manifest(folder)
    model_config = load_config(folder)
    model = build_skeleton(model_config, dtype)
    pin = device.type == "cuda"
    experts = [
        (entry["module"], ExpertLayout.from_json(entry["layout"]), load_host_rows(folder / entry["file"], pin))
        for entry in manifest["experts"]
    ]
    layers = install_offloaded_experts(model, experts, device, dtype, plan.slots_per_layer, config, model_config)
    _load_resident(model, folder, manifest["resident_files"], dtype)
    model.to(device).eval()
    log.info(
        "Offloaded model ready: %d MoE layers, %d of %d expert slots per layer on %s; %s",
        len(layers.modules),
        plan.slots_per_layer,
        layers.modules[0].num_experts,
        device,
        layers.miss_split.describe(),
    )
    return OffloadedModel(model, layers, plan)


def install_offloaded_experts(
    model: torch.nn.Module,
    experts: list[tuple[str, ExpertLayout, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    slots: int,
    config: OffloadConfig,
    model_config,
    refills: int | None = None,
) -> OffloadedExpertLayers:
    """Swap each (module name, layout, host rows) experts module for `OffloadedExperts` over a slot cache.
    With fewer slots than experts: with `config.prefetch`, link each layer to the next one's router, and decide
    (by `config.misses`, timed once here) what share of misses to compute on the CPU. `config.decode` graph: a
    compiled decode step keeps the experts on the device (`graph_decode`), refilling up to `refills` slots a
    layer a step (default top-k: every miss)."""
    copier = CopyStream(device)
    act_fn = ACT2FN[model_config.hidden_act]
    top_k = model_config.num_experts_per_tok
    kernels = fused_decode_kernels(config.kernel, experts[0][1], device, model_config.hidden_act, top_k)
    modules = []
    for name, layout, host_rows in experts:  # one layout per model
        cache = ExpertCache(host_rows, slots, device, copier, config.cache_policy)
        module = OffloadedExperts(layout, cache, act_fn, dtype, kernels)
        model.set_submodule(name, module)
        modules.append(module)
    layers = OffloadedExpertLayers(modules, MissSplit("copy", 0.0))
    if slots < modules[0].num_experts:
        if config.prefetch:
            link_predictors(model, modules, model_config)
        layout, host_rows = experts[0][1], experts[0][2]
        layers.miss_split = calibrate_miss_split(config.misses, layout, host_rows, device, dtype, act_fn)
        for module in modules:
            module.miss_split = layers.miss_split
    if config.decode == "graph":
        layers.graph_decode = GraphDecode(modules, top_k, device, refills=top_k if refills is None else refills)
    return layers


def fused_decode_kernels(
    kernel: ExpertKernel, layout: ExpertLayout, device: torch.device, hidden_act: str, top_k: int
) -> DecodeKernels | None:
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
        log.warning(
            "The Triton expert kernels failed their check here; decode dequantizes, then multiplies", exc_info=True
        )
        return None
    if kernel == "auto" and tuning and tuning.fused_ms > tuning.torch_ms:
        log.info("Dequantize-then-multiply is faster here than the Triton expert kernels; decode uses it")
        return None
    log.info("Decode's experts: Triton kernels (relative difference to dequantize-then-multiply %.1e)", error)
    code = triton_experts.code_table(layout, device)
    return DecodeKernels(
        partial(triton_experts.fused_mix_decode, layout, code, blocks),
        partial(triton_experts.fused_mix_decode_table, layout, code, blocks),
    )


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
    model.tie_weights()  # type: ignore[operator]  # tied lm_head / embeddings are stored once
    still_empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise RuntimeError(f"the converted model lacks weights for {still_empty[:5]} ({len(still_empty)} in all)")
