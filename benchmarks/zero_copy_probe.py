"""Zero-copy probe: can decode's Triton expert kernels read a missed expert straight from page-locked host RAM
over the bus (mapped memory, no copy into a slot first), and how fast?

Why it matters: at Qwen3-Next's shapes a compiled decode still breaks its graph at every MoE layer, because
the host decides which experts to copy; on an H100 (2026-11-26) that gap cost about 1.1 ms per layer, 53 ms
of a 97 ms token. A decode step with no break at all would keep a table of which expert sits in which slot
on the device and let the kernels read each routed expert from its slot, or from host RAM when it has none,
refilling slots between steps. That design stands on one number, measured here: the bandwidth a kernel gets
reading mapped host memory, against copying the rows into slots and reading them from GPU memory.

For one token through k experts (k = 1, 2, 5, 10) it times the same kernels (`triton_experts`) over rows in
GPU memory (all hits), over the same rows read in place from host RAM (all misses, zero-copy), and one copy
per expert into slots followed by the kernels (today's miss path, without its host bookkeeping), and checks
the zero-copy result against the in-memory one.

    python -m benchmarks.zero_copy_probe                                          # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.zero_copy_probe --smoke --device cpu  # checks it runs here
"""

import argparse
import json
from pathlib import Path

import torch

from benchmarks.moe_offload_gpu import REAL_SHAPES, RESULTS, SMOKE_SHAPES, Clock, seconds_per_call, synthetic_host_rows
from worker.engine.moe_offload.packing import ExpertLayout
from worker.engine.moe_offload.pinning import mapped_device_view
from worker.engine.moe_offload.triton_experts import Blocks, code_table, fused_mix_decode, tune


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = SMOKE_SHAPES if args.smoke else REAL_SHAPES
    layout = ExpertLayout(shapes["hidden_size"], shapes["moe_intermediate_size"], args.quant)
    top_k = shapes["num_experts_per_tok"]
    dtype = torch.bfloat16 if cuda else torch.float32
    clock = Clock(device)

    # Separate rows for each path, so none of them reads what another left in a cache.
    host_rows = synthetic_host_rows(layout, layers=1, experts=top_k, pin=False)[0]
    mapped = mapped_device_view(host_rows, device) if cuda else host_rows  # on the CPU, memory is memory
    copy_source = synthetic_host_rows(layout, layers=1, experts=top_k, pin=cuda)[0]
    in_memory = copy_source.to(device)
    slots = torch.empty_like(in_memory)
    blocks = tune(layout, device, top_k).blocks if cuda else Blocks()
    code = code_table(layout, device)
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = {"card": card, "smoke": args.smoke, "quant": args.quant, "row_bytes": layout.row_bytes,
              "blocks": vars(blocks)}
    print(f"# {card}; one token through k experts of {layout.row_bytes / 2**20:.2f} MiB; kernels {blocks}")

    def measure(k: int) -> dict:
        indices = torch.arange(k, device=device).repeat(2)  # rows 0..k-1, then routing positions 0..k-1
        weights = torch.rand(k, device=device, dtype=dtype)
        x = torch.randn(1, layout.hidden, device=device, dtype=dtype)

        def kernels(rows: torch.Tensor) -> torch.Tensor:
            return fused_mix_decode(layout, code, blocks, rows, indices, weights, x)

        def copy_then_kernels() -> torch.Tensor:
            for row in range(k):  # one copy per missed expert, as the cache issues them
                slots[row].copy_(copy_source[row], non_blocking=True)
            return kernels(slots)

        difference = (kernels(mapped) - kernels(host_rows.to(device))).abs().max().item()
        run = {"experts": k, "zero_copy_max_difference": difference,
               "in_memory_us": seconds_per_call(lambda: kernels(in_memory), clock, args.repeats) * 1e6,
               "zero_copy_us": seconds_per_call(lambda: kernels(mapped), clock, args.repeats) * 1e6,
               "copy_then_kernels_us": seconds_per_call(copy_then_kernels, clock, args.repeats) * 1e6}
        run["zero_copy_gb_per_s"] = k * layout.row_bytes / run["zero_copy_us"] / 1e3
        return run

    report["runs"] = [measure(k) for k in sorted({min(k, top_k) for k in (1, 2, 5, top_k)})]
    print("| experts | in GPU memory us | zero-copy us | zero-copy GB/s | copy, then kernels us | zero-copy result |")
    print("|---------|------------------|--------------|----------------|-----------------------|------------------|")
    for run in report["runs"]:
        same = "same" if run["zero_copy_max_difference"] == 0 else f"differs by {run['zero_copy_max_difference']:.2g}"
        print(f"| {run['experts']:7d} | {run['in_memory_us']:16.1f} | {run['zero_copy_us']:12.1f} "
              f"| {run['zero_copy_gb_per_s']:14.1f} | {run['copy_then_kernels_us']:21.1f} | {same:16s} |")
    out = args.out or RESULTS / f"zero_copy_probe-{card.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"# wrote {out}")
    return report


if __name__ == "__main__":
    main()
