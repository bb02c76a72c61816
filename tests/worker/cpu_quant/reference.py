"""The block formats' meaning written plainly in torch: what the kernels are checked against."""

import torch

from worker.engine.cpu_quant.kernels import BLOCK
from worker.engine.cpu_quant.packing import PackedWeight


def dequantize(packed: PackedWeight) -> torch.Tensor:
    """The float32 [N, K] weight the codes stand for."""
    rows = packed.codes.shape[0]
    scales = packed.scales.float().unsqueeze(-1)
    if packed.format == "q4":
        assert packed.minimums is not None
        codes = packed.codes.reshape(rows, -1, BLOCK // 2)
        values = torch.cat((codes & 0x0F, codes >> 4), dim=-1).float()
        weight = values * scales + packed.minimums.float().unsqueeze(-1)
    else:
        weight = packed.codes.reshape(rows, -1, BLOCK).float() * scales
    return weight.reshape(rows, -1)[:, : packed.in_features]
