"""Convert a Hugging Face checkpoint into the offload format, streaming it one tensor at a time.

Output folder:
- `experts-NNN.safetensors`: one per MoE layer, a single uint8 tensor `rows` [experts, row_bytes];
- `resident-NNNNN.safetensors`: every other weight, as the checkpoint stores it;
- the checkpoint's config and tokenizer files, and `offload-manifest.json` (written last: its presence
  marks a complete conversion).

Host RAM stays bounded: tensors are read one at a time from memory-mapped shards, an expert is quantized
as soon as its matrices have all been read, a layer's rows are written and freed once it is complete,
and resident weights are flushed to disk every `RESIDENT_FLUSH_BYTES`.
"""

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from worker.engine.moe_offload.checkpoint import (
    SIDE_FILE_PATTERNS,
    ExpertPiece,
    ExpertsModuleInfo,
    build_skeleton,
    classify,
    fingerprint,
    load_config,
    model_key,
    require_fused_experts,
    weight_files,
)
from worker.engine.moe_offload.config import ExpertQuant
from worker.engine.moe_offload.packing import ExpertLayout, pack_expert

log = logging.getLogger(__name__)

MANIFEST_NAME = "offload-manifest.json"
FORMAT_VERSION = 1
RESIDENT_FLUSH_BYTES = 1 << 30
_GIB = 1024**3


class ConversionError(RuntimeError):
    """The conversion cannot run here (not enough disk or host RAM); the message says what is needed."""


@dataclass
class _LayerInProgress:
    info: ExpertsModuleInfo
    layout: ExpertLayout
    rows: torch.Tensor
    pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    packed: set[int] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return len(self.packed) == self.info.num_experts

    @property
    def pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.pending.values() for t in parts.values())


class _MemoryMeter:
    """Bytes held by the conversion itself; refuses to go past the host RAM budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.peak = 0

    def check(self, held: int, what: str) -> None:
        self.peak = max(self.peak, held)
        if held > self.budget:
            raise ConversionError(
                f"converting needs {held / _GIB:.2f} GB of host RAM at {what}, more than HOST_MEMORY_GB "
                f"({self.budget / _GIB:.2f} GB); the checkpoint's shards interleave layers too much for it"
            )


def is_converted(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).exists()


def read_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            f"{folder} holds offload format {manifest.get('format_version')}, not "
            f"{FORMAT_VERSION}; delete it to convert again"
        )
    return manifest


def estimate_output_bytes(
    experts_modules: dict[str, ExpertsModuleInfo], skeleton: torch.nn.Module, quant: ExpertQuant
) -> tuple[int, int]:
    """(expert bytes, resident bytes at the checkpoint's 16-bit width) of a converted model."""
    expert_bytes = sum(
        m.num_experts * ExpertLayout(m.hidden, m.intermediate, quant).row_bytes for m in experts_modules.values()
    )
    expert_params = {f"{name}.{p}" for name in experts_modules for p in ("gate_up_proj", "down_proj")}
    resident_bytes = sum(p.numel() * 2 for n, p in skeleton.named_parameters() if n not in expert_params)
    return expert_bytes, resident_bytes


def convert_checkpoint(
    checkpoint_dir: Path, output_dir: Path, quant: ExpertQuant, host_memory_gb: float, show_progress: bool = True
) -> Path:
    """Convert `checkpoint_dir` into `output_dir` (atomically: a partial run leaves only a `.partial` folder)."""
    started = time.perf_counter()
    config = load_config(checkpoint_dir)
    skeleton = build_skeleton(config)
    experts_modules = require_fused_experts(skeleton, config)
    shards = weight_files(checkpoint_dir)
    expert_bytes, resident_bytes = estimate_output_bytes(experts_modules, skeleton, quant)
    del skeleton

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(output_dir.parent).free
    needed_disk = int((expert_bytes + resident_bytes) * 1.05)
    if free_disk < needed_disk:
        raise ConversionError(
            f"converting {checkpoint_dir.name} needs {needed_disk / _GIB:.1f} GB of disk in "
            f"{output_dir.parent}, {free_disk / _GIB:.1f} GB free"
        )
    budget = int(host_memory_gb * _GIB) if host_memory_gb > 0 else psutil.virtual_memory().available
    meter = _MemoryMeter(budget)

    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    writer = _Writer(partial, experts_modules, quant, meter)
    total_bytes = sum(shard.stat().st_size for shard in shards)
    log.info(
        "Converting %s (%d shards, %.1f GB) to %s experts: %.1f GB of experts, %.1f GB resident",
        checkpoint_dir,
        len(shards),
        total_bytes / _GIB,
        quant,
        expert_bytes / _GIB,
        resident_bytes / _GIB,
    )
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="converting", disable=not show_progress) as bar:
        for shard in shards:
            with safe_open(str(shard), framework="pt") as reader:
                keys = list(reader.keys())
                bytes_per_key = shard.stat().st_size / max(1, len(keys))
                for key in keys:
                    writer.add(model_key(key), reader.get_tensor(key))
                    bar.update(bytes_per_key)
    writer.finish()

    for pattern in SIDE_FILE_PATTERNS:
        for side_file in checkpoint_dir.glob(pattern):
            if side_file.name != "model.safetensors.index.json":
                shutil.copy2(side_file, partial / side_file.name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(checkpoint_dir),
        "source_fingerprint": fingerprint(checkpoint_dir),
        "quant": quant,
        "experts": writer.experts_entries,
        "resident_files": writer.resident_files,
        "expert_bytes": writer.expert_bytes,
        "resident_bytes": writer.resident_bytes_written,
        "resident_params": writer.resident_params,
        "conversion_peak_host_bytes": meter.peak,
        "conversion_seconds": round(time.perf_counter() - started, 1),
    }
    (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    log.info("Converted in %.0f s (peak %.2f GB held)", manifest["conversion_seconds"], meter.peak / _GIB)
    return output_dir


class _Writer:
    def __init__(
        self, folder: Path, experts_modules: dict[str, ExpertsModuleInfo], quant: ExpertQuant, meter: _MemoryMeter
    ):
        self.folder = folder
        self.experts_modules = experts_modules
        self.quant = quant
        self.meter = meter
        self.quantize_on = "cuda" if torch.cuda.is_available() else "cpu"
        self.layers: dict[str, _LayerInProgress] = {}
        self.experts_entries: list[dict] = []
        self.expert_bytes = 0
        self.resident: dict[str, torch.Tensor] = {}
        self.resident_files: list[str] = []
        self.resident_bytes_written = 0
        self.resident_params = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        piece = classify(key, self.experts_modules)
        if piece is None:
            self.resident[key] = tensor
            if self._resident_bytes() >= RESIDENT_FLUSH_BYTES:
                self._flush_resident()
        else:
            self._add_expert_piece(piece, tensor)
        self.meter.check(self._held_bytes(), key)

    def _add_expert_piece(self, piece: ExpertPiece, tensor: torch.Tensor) -> None:
        layer = self.layers.get(piece.module)
        if layer is None:
            info = self.experts_modules[piece.module]
            layout = ExpertLayout(info.hidden, info.intermediate, self.quant)
            rows = torch.empty((info.num_experts, layout.row_bytes), dtype=torch.uint8)
            layer = self.layers[piece.module] = _LayerInProgress(info, layout, rows)
        if piece.index is None:  # a fused tensor covers every expert
            for index in range(layer.info.num_experts):
                self._add_part(layer, index, piece.part, tensor[index])
        else:
            self._add_part(layer, piece.index, piece.part, tensor)
        if layer.done:
            self._write_layer(layer)

    def _add_part(self, layer: _LayerInProgress, index: int, part: str, tensor: torch.Tensor) -> None:
        parts = layer.pending.setdefault(index, {})
        parts[part] = tensor
        if "gate_up" not in parts and {"gate", "up"} <= parts.keys():
            parts["gate_up"] = torch.cat([parts.pop("gate"), parts.pop("up")], dim=0)
        if {"gate_up", "down"} <= parts.keys():
            pack_expert(layer.layout, parts["gate_up"], parts["down"], layer.rows[index], self.quantize_on)
            del layer.pending[index]
            layer.packed.add(index)

    def _write_layer(self, layer: _LayerInProgress) -> None:
        file_name = f"experts-{len(self.experts_entries):03d}.safetensors"
        save_file({"rows": layer.rows}, str(self.folder / file_name))
        self.experts_entries.append(
            {
                "module": layer.info.name,
                "file": file_name,
                "num_experts": layer.info.num_experts,
                "layout": layer.layout.to_json(),
            }
        )
        self.expert_bytes += layer.rows.numel()
        del self.layers[layer.info.name]

    def _resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.resident.values())

    def _held_bytes(self) -> int:
        return self._resident_bytes() + sum(layer.rows.numel() + layer.pending_bytes for layer in self.layers.values())

    def _flush_resident(self) -> None:
        if not self.resident:
            return
        file_name = f"resident-{len(self.resident_files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self.resident.items()}, str(self.folder / file_name))
        self.resident_files.append(file_name)
        self.resident_bytes_written += self._resident_bytes()
        self.resident_params += sum(t.numel() for t in self.resident.values())
        self.resident.clear()

    def finish(self) -> None:
        self._flush_resident()
        if self.layers:
            missing = {name: layer.info.num_experts - len(layer.packed) for name, layer in self.layers.items()}
            raise ConversionError(f"the checkpoint lacks expert weights: {missing} experts incomplete")
        absent = set(self.experts_modules) - {entry["module"] for entry in self.experts_entries}
        if absent:
            raise ConversionError(f"the checkpoint has no expert weights for {sorted(absent)}")
