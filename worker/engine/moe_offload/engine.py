"""The worker's engine for MoE models bigger than the device: same interface and `generate` as the
transformers engine, with the model built by the offload loader."""

import logging
import re
from pathlib import Path

import torch

from shared.schemas import ExpertOffloadStats
from worker.engine.compiled_decode import DecodeHooks, static_cache_bytes
from worker.engine.config import EngineConfig
from worker.engine.moe_offload.budget import plan_memory
from worker.engine.moe_offload.builder import OffloadedModel, build_offloaded_model
from worker.engine.moe_offload.checkpoint import fingerprint, load_config, resolve_checkpoint_dir
from worker.engine.moe_offload.config import ExpertDecode, ExpertQuant, OffloadConfig
from worker.engine.moe_offload.converter import ConversionError, convert_checkpoint, is_converted, read_manifest
from worker.engine.moe_offload.cpu_moe_block import install_cpu_moe_blocks
from worker.engine.moe_offload.delta_rule import install_fused_delta_rule
from worker.engine.moe_offload.graph_decode import GraphDecode
from worker.engine.moe_offload.packing import ExpertLayout
from worker.engine.transformers_engine import TransformersEngine

log = logging.getLogger(__name__)

_GIB = 1024**3


def converted_folder(root: Path, model_id: str, quant: ExpertQuant) -> Path:
    return root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '--', model_id.strip('/'))}-{quant}"


class MoEOffloadEngine(TransformersEngine):
    def __init__(self, config: EngineConfig, offload: OffloadConfig, converted_root: Path):
        """`converted_root`: where a checkpoint is converted (one folder per model and quantization)."""
        super().__init__(config)
        self.offload = offload
        self.converted_root = converted_root
        self.offloaded: OffloadedModel | None = None

    def load(self) -> None:
        source = self.config.model_path
        folder = Path(source).expanduser()
        if not is_converted(folder):  # the model path may name an already converted folder
            folder = converted_folder(self.converted_root, source, self.offload.quant)
            if self._needs_conversion(folder):
                checkpoint_dir = resolve_checkpoint_dir(source)
                convert_checkpoint(checkpoint_dir, folder, self.offload.quant, self.offload.host_memory_gb)
        self.weights_path = str(folder)  # tokenizer and config load from the converted folder
        super().load()

    @property
    def compiles_decode(self) -> bool:
        """On the CPU decode compiles only when `decode_compile` is on: there the step's time is the kernels'
        (experts, int4 projections, the fused DeltaNet step), and compiling every layer costs minutes at load for
        no per-layer gain that `benchmarks/cpu_moe.py` (its ours-compiled variant) could measure."""
        if self.device == "cpu":
            return self.config.decode_compile == "on"
        return super().compiles_decode

    def decode_hooks(self) -> DecodeHooks | None:
        return self.offloaded.experts if self.offloaded is not None else None

    def _expert_decode(self) -> ExpertDecode:
        """The path a decode step's experts take (EXPERT_DECODE): auto = graph wherever decode compiles."""
        if self.offload.decode == "host":
            return "host"
        if self.compiles_decode:
            return "graph"
        if self.offload.decode == "graph":
            log.warning(
                "EXPERT_DECODE=graph takes effect in a compiled decode only (DECODE_COMPILE is %s on %s): "
                "decode runs the experts through the host",
                self.config.decode_compile,
                self.device,
            )
        return "host"

    def _needs_conversion(self, folder: Path) -> bool:
        """No conversion yet, one in an older format, or one of a local checkpoint that has changed since
        (a hub id's conversion stands: its snapshot is fixed, and the download may be gone)."""
        if not is_converted(folder):
            return True
        try:
            manifest = read_manifest(folder)
        except ConversionError as error:
            log.warning("%s; converting again", error)
            return True
        source = Path(self.config.model_path).expanduser()
        if source.is_dir() and manifest.get("source_fingerprint") != fingerprint(source):
            log.warning("%s changed since it was converted into %s; converting again", source, folder)
            return True
        return False

    def _load_model(self) -> torch.nn.Module:
        folder = Path(self.weights_path)
        manifest = read_manifest(folder)
        experts = manifest["experts"]
        layout = ExpertLayout.from_json(experts[0]["layout"])
        device = torch.device(self.device)
        device_budget = self._cap_gpu_memory() if device.type == "cuda" else 0.0
        config = load_config(folder)
        resident_bytes = manifest["resident_params"] * self.torch_dtype.itemsize
        if self.compiles_decode:  # allocated up front for the whole length, unlike a growing cache
            length = self._context_length(config)
            kv_bytes = static_cache_bytes(config, length, self.torch_dtype)
            log.log(
                logging.WARNING if kv_bytes > self.offload.gpu_reserve_gb * _GIB else logging.INFO,
                "The static cache of a compiled decode holds %d tokens: %.2f GB of the GPU budget, taken from "
                "the expert slots (MAX_MODEL_LEN sets the length)",
                length,
                kv_bytes / _GIB,
            )
            resident_bytes += kv_bytes
        top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
        if device.type == "cuda" and self._expert_decode() == "graph":  # held beside the slots, for the refills
            resident_bytes += GraphDecode.scratch_bytes(len(experts), top_k, layout.row_bytes)
        plan = plan_memory(
            device_budget_gb=device_budget,
            reserve_gb=self.offload.gpu_reserve_gb,
            host_budget_gb=self.offload.host_memory_gb,
            resident_bytes=resident_bytes,
            num_layers=len(experts),
            experts_per_layer=experts[0]["num_experts"],
            row_bytes=layout.row_bytes,
            top_k=top_k,
            share_host_rows=device.type == "cpu",
            slots_override=self.offload.slots,
        )
        offload = self.offload.model_copy(update={"decode": self._expert_decode()})
        self.offloaded = build_offloaded_model(folder, device, self.torch_dtype, plan, offload)
        if device.type == "cpu":
            self._quantize_cpu_linears(self.offloaded.model)  # the dense layers; the experts are 4-bit already
            install_fused_delta_rule()
            install_cpu_moe_blocks(self.offloaded.model)
        return self.offloaded.model

    def _cap_gpu_memory(self) -> float:
        """Hold the process to GPU_MEMORY_GB on a bigger card, so what runs here would run on that budget."""
        total_gb = torch.cuda.get_device_properties(0).total_memory / _GIB
        budget = self.offload.gpu_memory_gb or total_gb
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total_gb))
        return min(budget, total_gb)

    def expert_offload_stats(self) -> ExpertOffloadStats | None:
        if self.offloaded is None:
            return None
        experts = self.offloaded.experts
        split = experts.miss_split
        return ExpertOffloadStats(
            slots_per_layer=self.offloaded.plan.slots_per_layer,
            experts_per_layer=experts.modules[0].num_experts,
            miss_mode=split.mode,
            cpu_share=round(split.cpu_share, 4),
            **experts.cache_stats().counters(),
        )
