"""Swap a loaded model's linear layers for quantized ones: q4 in the decoder, q8 for the output head."""

import contextlib
import ctypes

import torch
from transformers import PreTrainedModel

from worker.engine.cpu_quant.linear import QuantizedLinear


def quantize_linears(model: PreTrainedModel) -> int:
    """Every `nn.Linear` of `model` becomes a `QuantizedLinear`: the output embedding (whose rounding moves
    every logit) as q8, the rest as q4. Returns the bytes the weights take now."""
    head = model.get_output_embeddings()
    total = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                quantized = QuantizedLinear.from_linear(child, "q8" if child is head else "q4")
                setattr(parent, name, quantized)
                total += quantized.packed().nbytes
    model.config.tie_word_embeddings = False  # the head is its own (quantized) copy now
    # The parameters left (embeddings, norms) may still be views of the checkpoint's memory map, which keeps
    # the whole file mapped and the pages the packing read resident: own copies let the mapping go.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    _return_freed_heap()
    return total


def _return_freed_heap() -> None:
    """glibc keeps the float weights' freed heap pages for reuse; give them back (elsewhere, nothing to do)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
