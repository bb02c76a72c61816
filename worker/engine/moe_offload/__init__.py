"""An engine for mixture-of-experts models bigger than the GPU: resident dense part, offloaded experts.

Everything but the routed experts lives on the device. Each MoE layer's experts are packed, one row of
bytes per expert (4-bit NF4 by default), in host RAM; a per-layer cache of device slots holds the ones in
use, filled by asynchronous copies. The experts module of transformers' own model is swapped for
`OffloadedExperts`, so attention, DeltaNet, the KV cache and `generate` stay transformers' own.
"""
