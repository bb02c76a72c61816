"""One token through k experts on the CPU, read in place from their 4-bit host rows by an AVX2 (or AVX-512
VNNI) kernel.

The rows keep bitsandbytes' layout (`packing.py`): nothing is repacked, so the kernel costs no extra RAM
and no load time, and the 4-bit codes are the ones the GPU path reads. The kernel (`nf4_matvec.cpp`) maps
each code through the codebook rounded to int8 and quantizes the activation to int8 per 64 values, so its
result differs from dequantize-then-multiply by that rounding only (cosine similarity above 0.999 on
random experts; see the tests). Gate/up of all k experts is one call, the activation and product in torch,
then down of all k one call: two parallel regions per token, whatever k.
"""

from collections.abc import Callable, Sequence
from functools import cache

import bitsandbytes.functional as bnbf
import torch

from worker.engine.moe_offload.int4_extension import load_nf4_matvec
from worker.engine.moe_offload.packing import ExpertLayout

_BLOCK = 64  # the kernel reads whole absmax blocks: matrix rows must be a multiple of this


CODEBOOK_LEVELS = 2047  # the kernel's integer scale for code values and activations (nf4_matvec.cpp)


def codebook_int16(quant: str) -> torch.Tensor:
    """The 16 code values of `quant` (nf4 or fp4, in [-1, 1]) times 2047, rounded: the kernel's lookup table."""
    return (bnbf.get_4bit_type(quant, device="cpu") * CODEBOOK_LEVELS).round().to(torch.int16)


class CpuExpertKernel:
    """The vectorized path for one layout; build it with `for_layout`, which says None where it does not apply."""

    def __init__(self, layout: ExpertLayout, matvec: Callable[..., torch.Tensor]):
        self.layout = layout
        self._matvec = matvec
        self._lut = codebook_int16(layout.quant)
        sections = layout.sections
        self._gate_up = (sections["gate_up_packed"].offset, sections["gate_up_absmax"].offset)
        self._down = (sections["down_packed"].offset, sections["down_absmax"].offset)

    @staticmethod
    def covers(layout: ExpertLayout) -> bool:
        """4-bit rows whose matrix rows are whole blocks (every real MoE's are)."""
        return layout.is_4bit and layout.hidden % _BLOCK == 0 and layout.intermediate % _BLOCK == 0

    @staticmethod
    @cache
    def for_layout(layout: ExpertLayout) -> "CpuExpertKernel | None":
        """The kernel for `layout` on this host (built at the first call of the process), or None."""
        if not CpuExpertKernel.covers(layout):
            return None
        matvec = load_nf4_matvec()
        return CpuExpertKernel(layout, matvec) if matvec is not None else None

    def forward(
        self, rows: torch.Tensor, experts: Sequence[int], weights: Sequence[float], x: torch.Tensor, act_fn
    ) -> torch.Tensor:
        """x [1, hidden] through the `experts` of `rows` [experts, row_bytes] (uint8, on the CPU), each output
        times its routing weight, summed: [1, hidden] float32."""
        layout = self.layout
        ids = torch.tensor(list(experts), dtype=torch.long)
        token = x.reshape(1, layout.hidden).to(torch.float32).contiguous()
        gate_up = self._matvec(token, rows, ids, self._lut, *self._gate_up, 2 * layout.intermediate, layout.hidden)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = (act_fn(gate) * up).contiguous()
        down = self._matvec(hidden, rows, ids, self._lut, *self._down, layout.hidden, layout.intermediate)
        return torch.tensor(list(weights), dtype=torch.float32).unsqueeze(0) @ down
