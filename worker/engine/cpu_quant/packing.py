"""Float weights to the kernels' block formats and back (in torch, at load).

q4: per block of 32 weights along a row, a float16 scale d and minimum m, codes q = round((w - m) / d) in 0..15;
w ~ d * q + m (GGUF's Q4_1). q8: a float16 scale d = max |w| / 127 and int8 codes (GGUF's Q8_0). Weights that
came from such a GGUF (the bundled model's did) come back to the same codes: packing them again loses nothing.
Rows whose length is not a multiple of 32 are padded with zeros to whole blocks.
"""

from dataclasses import dataclass
from typing import Literal

import torch

from worker.engine.cpu_quant.kernels import BLOCK

WeightFormat = Literal["q4", "q8"]


@dataclass(frozen=True)
class PackedWeight:
    format: WeightFormat
    codes: torch.Tensor  # q4: uint8 [N, blocks * 16]; q8: int8 [N, blocks * 32]
    scales: torch.Tensor  # float16 [N, blocks]
    minimums: torch.Tensor | None  # q4: float16 [N, blocks]
    in_features: int

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.minimums)
        return sum(part.numel() * part.element_size() for part in parts if part is not None)


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, ceil(K / 32), 32] float32, zero-padded."""
    out_features, in_features = weight.shape
    padding = -in_features % BLOCK
    padded = torch.nn.functional.pad(weight.detach().float(), (0, padding))
    return padded.reshape(out_features, -1, BLOCK)


def pack(weight: torch.Tensor, fmt: WeightFormat) -> PackedWeight:
    blocks = _blocks(weight)
    if fmt == "q4":
        low, high = blocks.amin(-1), blocks.amax(-1)
        scales, minimums = ((high - low) / 15).half(), low.half()
        step = scales.float().unsqueeze(-1)
        codes = ((blocks - minimums.float().unsqueeze(-1)) / torch.where(step > 0, step, 1)).round().clamp(0, 15)
        codes = codes.to(torch.uint8)
        packed = codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)
        return PackedWeight("q4", packed.reshape(len(blocks), -1).contiguous(), scales, minimums, weight.shape[1])
    scales = (blocks.abs().amax(-1) / 127).half()
    step = scales.float().unsqueeze(-1)
    codes = (blocks / torch.where(step > 0, step, 1)).round().clamp(-127, 127).to(torch.int8)
    return PackedWeight("q8", codes.reshape(len(blocks), -1).contiguous(), scales, None, weight.shape[1])


def stack_rows(*parts: PackedWeight) -> PackedWeight:
    """Several matrices over the same input as one (their rows one after another): one call computes them all."""
    first = parts[0]
    if any(part.format != first.format or part.in_features != first.in_features for part in parts):
        raise ValueError("only matrices of one format and input size stack")
    minimums = None if first.minimums is None else torch.cat([part.minimums for part in parts])  # type: ignore[misc]
    return PackedWeight(
        first.format,
        torch.cat([part.codes for part in parts]),
        torch.cat([part.scales for part in parts]),
        minimums,
        first.in_features,
    )
