"""One expert as one row of bytes: the unit that is stored, copied to the device and cached.

A row holds the expert's fused gate/up matrix [2I, H] and its down matrix [H, I], either quantized
block-wise to 4 bits by bitsandbytes (packed nibbles plus one float32 absmax per block: 4.5 bits per
weight at block 64) or raw 16-bit. One contiguous row per expert means one host-to-device copy per miss.
"""

from dataclasses import asdict, dataclass
from functools import cached_property

import bitsandbytes.functional as bnbf
import torch

from worker.engine.moe_offload.config import ExpertQuant

QUANT_BLOCKSIZE = 64
_ALIGN = 16  # every section starts 16-byte aligned so any dtype view of it is legal and fast


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class Section:
    offset: int
    nbytes: int
    dtype: torch.dtype

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one expert row, for one (hidden, intermediate, quant) shape."""

    hidden: int
    intermediate: int
    quant: ExpertQuant

    @property
    def is_4bit(self) -> bool:
        return self.quant in ("nf4", "fp4")

    @property
    def gate_up_numel(self) -> int:
        return 2 * self.intermediate * self.hidden

    @property
    def down_numel(self) -> int:
        return self.hidden * self.intermediate

    @cached_property
    def sections(self) -> dict[str, Section]:
        names_sizes: list[tuple[str, int, torch.dtype]] = []
        for name, numel in (("gate_up", self.gate_up_numel), ("down", self.down_numel)):
            if self.is_4bit:
                if numel % QUANT_BLOCKSIZE:
                    raise ValueError(f"expert matrix of {numel} weights is not a multiple of {QUANT_BLOCKSIZE}")
                names_sizes.append((f"{name}_packed", numel // 2, torch.uint8))
                names_sizes.append((f"{name}_absmax", numel // QUANT_BLOCKSIZE * 4, torch.float32))
            else:
                names_sizes.append((f"{name}_weight", numel * 2, torch.bfloat16))
        sections, offset = {}, 0
        for name, nbytes, dtype in names_sizes:
            sections[name] = Section(offset, nbytes, dtype)
            offset = _aligned(offset + nbytes)
        return sections

    @cached_property
    def row_bytes(self) -> int:
        return max(section.end for section in self.sections.values())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ExpertLayout":
        return cls(hidden=int(data["hidden"]), intermediate=int(data["intermediate"]), quant=data["quant"])


def pack_expert(
    layout: ExpertLayout, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor, quantize_on: str = "cpu"
) -> None:
    """Quantize (or copy) one expert's matrices into `out`, a uint8 row of `layout.row_bytes`.

    `quantize_on="cuda"` runs bitsandbytes' CUDA kernel (same format) instead of its CPU one, which is slow
    enough on a few cores to make converting Qwen3-Next's 24,576 experts take the better part of an hour."""
    expected = ((2 * layout.intermediate, layout.hidden), (layout.hidden, layout.intermediate))
    if tuple(gate_up.shape) != expected[0] or tuple(down.shape) != expected[1]:
        raise ValueError(f"expert shapes {tuple(gate_up.shape)}, {tuple(down.shape)}; expected {expected}")
    sections = layout.sections
    out.zero_()
    for name, weight in (("gate_up", gate_up), ("down", down)):
        if layout.is_4bit:
            packed, state = bnbf.quantize_4bit(
                weight.detach().to(device=quantize_on, dtype=torch.float32).contiguous(),
                blocksize=QUANT_BLOCKSIZE,
                quant_type=layout.quant,
                compress_statistics=False,
            )
            _write(out, sections[f"{name}_packed"], packed.reshape(-1))
            _write(out, sections[f"{name}_absmax"], state.absmax.to(torch.float32).reshape(-1))
        else:
            _write(out, sections[f"{name}_weight"], weight.detach().to(torch.bfloat16).reshape(-1))


def _write(row: torch.Tensor, section: Section, values: torch.Tensor) -> None:
    row[section.offset : section.end].copy_(values.contiguous().view(torch.uint8))


def section_view(rows: torch.Tensor, section: Section) -> torch.Tensor:
    """The section of every row in `rows` [n, row_bytes], viewed in its own dtype: [n, elements]."""
    return rows[:, section.offset : section.end].view(section.dtype)


def unpack_experts(layout: ExpertLayout, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, row_bytes] (on any device) -> gate_up [n, 2I, H] and down [n, H, I] in `dtype`."""
    n = rows.shape[0]
    shapes = {"gate_up": (n, 2 * layout.intermediate, layout.hidden), "down": (n, layout.hidden, layout.intermediate)}
    sections = layout.sections
    result = []
    for name, shape in shapes.items():
        if layout.is_4bit:
            # A row's blocks never straddle experts, so n experts' sections in a row are one valid
            # quantized tensor of n * numel weights: one dequantize call for all of them.
            packed = section_view(rows, sections[f"{name}_packed"]).contiguous()
            absmax = section_view(rows, sections[f"{name}_absmax"]).contiguous().reshape(-1)
            state = bnbf.QuantState(
                absmax=absmax, shape=shape, dtype=dtype, blocksize=QUANT_BLOCKSIZE, quant_type=layout.quant
            )
            result.append(bnbf.dequantize_4bit(packed.reshape(-1, 1), quant_state=state))
        else:
            result.append(section_view(rows, sections[f"{name}_weight"]).reshape(shape).to(dtype))
    return result[0], result[1]
