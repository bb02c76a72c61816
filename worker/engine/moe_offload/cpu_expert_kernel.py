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
        ids = torch.tensor(list(experts), dtype=torch.long)
        outputs = self._experts(rows, ids, x.reshape(1, self.layout.hidden), act_fn)
        return torch.tensor(list(weights), dtype=torch.float32).unsqueeze(0) @ outputs

    def forward_routed(
        self, rows: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, x: torch.Tensor, act_fn
    ) -> torch.Tensor:
        """Tokens `x` [T, hidden] through their routed experts (`top_k_index` [T, k] into `rows`), weighted by
        `top_k_weights` and summed per token: [T, hidden] float32. One token: one activation row for its k
        experts, and no read back to the host, so a compiled decode step traces straight through. More (a
        prompt): one activation row per (token, expert) pair, sorted by expert, so that an expert's matrix rows
        are read from RAM once and from the cache for its other tokens; nothing is dequantized, nothing padded."""
        tokens = x.shape[0]
        if tokens == 1:
            outputs = self._experts(rows, top_k_index.reshape(-1).to(torch.long), x, act_fn)
            return top_k_weights.reshape(1, -1).to(torch.float32) @ outputs
        flat_experts = top_k_index.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // top_k_index.shape[1]
        outputs = self._experts(rows, flat_experts[order].to(torch.long), x.index_select(0, token_of), act_fn)
        weights = top_k_weights.reshape(-1).index_select(0, order).to(torch.float32).unsqueeze(-1)
        return torch.zeros((tokens, self.layout.hidden), dtype=torch.float32).index_add_(0, token_of, outputs * weights)

    def _experts(self, rows: torch.Tensor, ids: torch.Tensor, inputs: torch.Tensor, act_fn) -> torch.Tensor:
        """`inputs` [1 or n, hidden] through experts `ids` [n] (the one input through each, or one each), not
        weighted: [n, hidden] float32. Two kernel calls: gate/up, then down."""
        layout = self.layout
        inputs = inputs.to(torch.float32).contiguous()
        gate_up = self._matvec(inputs, rows, ids, self._lut, *self._gate_up, 2 * layout.intermediate, layout.hidden)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = (act_fn(gate) * up).contiguous()
        return self._matvec(hidden, rows, ids, self._lut, *self._down, layout.hidden, layout.intermediate)
