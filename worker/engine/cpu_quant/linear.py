"""A linear layer whose weight is held in a block format and multiplied by the CPU kernels."""

import torch

from worker.engine.cpu_quant.kernels import q4_linear, q8_linear, unpack
from worker.engine.cpu_quant.packing import PackedWeight, WeightFormat, pack

#: Up to this many rows (tokens) the kernel multiplies; beyond it (a long prompt's prefill) the weight is
#: unpacked to float for one BLAS matmul, which is faster there.
KERNEL_MAX_ROWS = 16


class QuantizedLinear(torch.nn.Module):
    """Replaces an `nn.Linear` (same call, same output shape); the float weight is not kept."""

    codes: torch.Tensor
    scales: torch.Tensor
    minimums: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.format = packed.format
        self.in_features = packed.in_features
        self.out_features = packed.codes.shape[0]
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("minimums", packed.minimums)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, fmt: WeightFormat) -> "QuantizedLinear":
        return cls(pack(linear.weight, fmt), linear.bias)

    def packed(self) -> PackedWeight:
        return PackedWeight(self.format, self.codes, self.scales, self.minimums, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] > KERNEL_MAX_ROWS:
            weight = unpack(self.codes, self.scales, self.minimums, self.in_features)
            y = torch.nn.functional.linear(rows, weight, self.bias)
        else:
            rows = rows.contiguous()
            if self.minimums is not None:  # q4
                y = q4_linear(rows, self.codes, self.scales, self.minimums, self.in_features)
            else:
                y = q8_linear(rows, self.codes, self.scales, self.in_features)
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"
