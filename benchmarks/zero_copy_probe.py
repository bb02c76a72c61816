"""Zero-copy probe: can decode's Triton expert kernels read a missed expert straight from page-locked host RAM
over the bus (mapped memory, no copy into a slot first), and how fast?

Why it matters: at Qwen3-Next's shapes a compiled decode still breaks its graph at every MoE layer, because
the host decides which experts to copy; on an H100 (2026-11-26) that gap cost about 1.1 ms per layer, 53 ms
of a 97 ms token. A decode step with no break at all would keep a table of which expert sits in which slot
on the device and let the kernels read each routed expert from its slot, or from host RAM when it has none,
refilling slots between steps. That design stands on one number, measured here: the bandwidth a kernel gets
reading mapped host memory, against copying the rows into slots and reading them from GPU memory.

For one token through k experts (k = 1, 2, 5, 10) it times the same kernels (`triton_experts`) over rows in
GPU memory (all hits), over the same rows read in place from host RAM (all misses, zero-copy), gathered from
host RAM into device memory by a copy kernel first (graph decode's miss path), and one copy per expert into
slots followed by the kernels (the host path's misses, without its bookkeeping), and checks the zero-copy
results against the in-memory one. Each call reads the next of `--sets` sets of rows (over 100 MB
in all at real shapes), so no path is timed reading what the GPU's L2 cache (50 MB on an H100) kept from
the call before.

    python -m benchmarks.zero_copy_probe                                          # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.zero_copy_probe --smoke --device cpu  # checks it runs here
"""

import argparse
import json
from itertools import cycle
from pathlib import Path

import torch

from benchmarks.model_shapes import REAL_SHAPES, SMOKE_SHAPES
from benchmarks.moe_offload_gpu import RESULTS, Clock, seconds_per_call, synthetic_host_rows
from worker.engine.moe_offload.packing import ExpertLayout
from worker.engine.moe_offload.pinning import mapped_device_view
from worker.engine.moe_offload.triton_experts import Blocks, code_table, fused_mix_decode, fused_mix_decode_table, tune


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sets", type=int, default=6, help="sets of top-k rows the calls go round")
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
    pool = top_k * args.sets
    host_rows = synthetic_host_rows(layout, layers=1, experts=pool, pin=False)[0]
    mapped = mapped_device_view(host_rows, device) if cuda else host_rows  # on the CPU, memory is memory
    copy_source = synthetic_host_rows(layout, layers=1, experts=pool, pin=cuda)[0]
    in_memory = copy_source.to(device)
    slots = torch.empty_like(in_memory)
    blocks = tune(layout, device, top_k).blocks if cuda else Blocks()
    code = code_table(layout, device)
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = {
        "card": card,
        "smoke": args.smoke,
        "quant": args.quant,
        "row_bytes": layout.row_bytes,
        "blocks": vars(blocks),
    }
    print(f"# {card}; one token through k experts of {layout.row_bytes / 2**20:.2f} MiB; kernels {blocks}")

    def measure(k: int) -> dict:
        # set s: its rows s*top_k .. s*top_k+k-1, then routing positions 0..k-1
        sets = [torch.cat([torch.arange(k) + s * top_k, torch.arange(k)]).to(device) for s in range(args.sets)]
        turn = cycle(sets)
        in_slots = sets[0]  # the copies land in slots 0..k-1
        weights = torch.rand(k, device=device, dtype=dtype)
        x = torch.randn(1, layout.hidden, device=device, dtype=dtype)

        def kernels(rows: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
            return fused_mix_decode(layout, code, blocks, rows, next(turn) if indices is None else indices, weights, x)

        first_rows = cycle(range(0, pool, top_k))

        def copy_then_kernels() -> torch.Tensor:
            first = next(first_rows)
            for row in range(k):  # one copy per missed expert, as the cache issues them
                slots[row].copy_(copy_source[first + row], non_blocking=True)
            return kernels(slots, in_slots)

        no_slots = torch.full((pool,), -1, dtype=torch.int32, device=device)  # every expert a miss
        scratch = torch.empty((k, layout.row_bytes), dtype=torch.uint8, device=device)

        def gathered(indices: torch.Tensor | None = None) -> torch.Tensor:
            experts, positions = (next(turn) if indices is None else indices).view(2, k)
            return fused_mix_decode_table(
                layout, code, blocks, slots, mapped, scratch, experts, no_slots, positions, weights, x
            )

        expected = kernels(host_rows.to(device), sets[1])
        difference = max(
            (kernels(mapped, sets[1]) - expected).abs().max().item(), (gathered(sets[1]) - expected).abs().max().item()
        )
        run = {
            "experts": k,
            "zero_copy_max_difference": difference,
            "in_memory_us": seconds_per_call(lambda: kernels(in_memory), clock, args.repeats) * 1e6,
            "zero_copy_us": seconds_per_call(lambda: kernels(mapped), clock, args.repeats) * 1e6,
            "gathered_us": seconds_per_call(gathered, clock, args.repeats) * 1e6,
            "copy_then_kernels_us": seconds_per_call(copy_then_kernels, clock, args.repeats) * 1e6,
        }
        run["zero_copy_gb_per_s"] = k * layout.row_bytes / run["zero_copy_us"] / 1e3
        run["gathered_gb_per_s"] = k * layout.row_bytes / run["gathered_us"] / 1e3
        return run

    report["runs"] = [measure(k) for k in sorted({min(k, top_k) for k in (1, 2, 5, top_k)})]
    print(
        "| experts | in GPU memory us | zero-copy us (GB/s) | gathered us (GB/s) | copy, then kernels us "
        "| zero-copy results |"
    )
    print(
        "|---------|------------------|---------------------|--------------------|-----------------------"
        "|-------------------|"
    )
    for run in report["runs"]:
        same = "same" if run["zero_copy_max_difference"] == 0 else f"differ by {run['zero_copy_max_difference']:.2g}"
        zero_copy = f"{run['zero_copy_us']:.1f} ({run['zero_copy_gb_per_s']:.1f})"
        gathered = f"{run['gathered_us']:.1f} ({run['gathered_gb_per_s']:.1f})"
        print(
            f"| {run['experts']:7d} | {run['in_memory_us']:16.1f} | {zero_copy:>19} | {gathered:>18} "
            f"| {run['copy_then_kernels_us']:21.1f} | {same:17s} |"
        )
    out = args.out or RESULTS / f"zero_copy_probe-{card.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"# wrote {out}")
    return report


if __name__ == "__main__":
    main()
