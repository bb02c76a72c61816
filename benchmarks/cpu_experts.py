"""CPU expert kernels at Qwen3-Next's shapes: ms per expert-token, and each as a share of memory bandwidth.

One token through top-k (10) routed experts at once, as a decode step's CPU share would be: gate/up, SiLU,
down, the routing-weighted sum. Candidates, in this order:

  a. bitsandbytes dequantize-then-multiply, one expert at a time (the engine's path before the kernel)
  b. torch's `_weight_int4pack_mm_for_cpu` (group-wise int4, per-group scales and zeros) at group sizes
     32/64/128, the experts in a Python loop; and batched: the k experts' matrices packed as one (gathered
     ahead, not timed: a lower bound)
  c. torchao's CPU int4 (`Int4WeightOnlyConfig`, packing format "opaque") on nn.Linear, where it imports
  d. kt-kernel's CPU MoE operator (`KTMoEWrapper`), where it loads
  e. this engine's kernel (`CpuExpertKernel`), reading the NF4 rows in place: its AVX2 build, and its
     AVX-512 VNNI build where the host has AVX-512 VNNI

Every candidate reads a pool of experts larger than the last-level cache, a different random top-k each
token, so none is timed on weights a previous call left in cache. Bandwidth is a STREAM-like copy of
256 MiB (bytes read plus bytes written over the time) in the same run; a candidate's share is the bytes of
its 4-bit weights (with their scales) read per token over its time, against that bandwidth.

    python -m benchmarks.cpu_experts                    # 2 threads, writes results/cpu_experts-<cpu>.json
    python -m benchmarks.cpu_experts --threads 1 --tokens 100 --rounds 5
"""

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from worker.engine.cpu_extension import host_isas
from worker.engine.moe_offload import int4_extension
from worker.engine.moe_offload.cpu_expert_kernel import CpuExpertKernel
from worker.engine.moe_offload.cpu_experts import dequantized_expert_forward
from worker.engine.moe_offload.packing import ExpertLayout, pack_expert, unpack_experts

RESULTS = Path(__file__).parent / "results"
HIDDEN, INTERMEDIATE, TOP_K = 2048, 512, 10  # Qwen3-Next-80B-A3B's experts
SILU = torch.nn.functional.silu
_MIB = 1024**2

# One token's step: x [1, H] and the token's experts and weights -> [1, H] float32.
Step = Callable[[torch.Tensor, list[int], list[float]], torch.Tensor]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_cpu_report(report: dict, benchmark: str, out: Path | None) -> None:
    """`report` as JSON to `out`, by default `results/<benchmark>-<this CPU's model>.json`."""
    out = out or RESULTS / f"{benchmark}-{re.sub(r'[^A-Za-z0-9]+', '_', cpu_model()).strip('_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def copy_bandwidth_gbps(mib: int = 256, repeats: int = 10) -> list[float]:
    """STREAM-like copy on torch's threads: (read + written bytes) / time, per repeat."""
    source = torch.ones(mib * _MIB, dtype=torch.uint8)
    target = torch.empty_like(source)
    target.copy_(source)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        rates.append(2 * source.numel() / (time.perf_counter() - start) / 1e9)
    return rates


def read_bandwidth_gbps(mib: int = 256, repeats: int = 10) -> list[float]:
    """A read-only pass (a float32 sum) for context: a matvec only reads, and reads can go faster than copies."""
    source = torch.ones(mib * _MIB // 4, dtype=torch.float32)
    source.sum()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        source.sum()
        rates.append(source.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return rates


def nf4_pool(layout: ExpertLayout, experts: int, distinct: int) -> torch.Tensor:
    """`experts` NF4 rows: `distinct` really quantized random experts, tiled (separate copies in memory)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.empty((distinct, layout.row_bytes), dtype=torch.uint8)
    for row in base:
        gate_up = torch.randn(2 * layout.intermediate, layout.hidden, generator=generator) * 0.02
        down = torch.randn(layout.hidden, layout.intermediate, generator=generator) * 0.02
        pack_expert(layout, gate_up, down, row)
    return base[torch.arange(experts) % distinct].contiguous()


# --- b: torch's CPU int4 layout ---------------------------------------------------------------------------


def int4pack(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> torch's CPU int4 pack and its [K/group, N, 2] bf16 scales and zeros (asymmetric,
    per group: w = (q - 8) * scale + zero)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale
    scales_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scales_zeros


def int4pack_bytes(n: int, k: int, group: int) -> int:
    return n * k // 2 + (k // group) * n * 2 * 2


def torch_int4_loop(layout: ExpertLayout, rows: torch.Tensor, group: int) -> tuple[Step, int]:
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    packed = []
    for row in rows:
        gate_up, down = unpack_experts(layout, row.unsqueeze(0), torch.float32)
        packed.append((int4pack(gate_up[0], group), int4pack(down[0], group)))

    def step(x: torch.Tensor, experts: list[int], weights: list[float]) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        total = torch.zeros((1, layout.hidden), dtype=torch.float32)
        for expert, weight in zip(experts, weights, strict=True):
            (gu, gu_sz), (dn, dn_sz) = packed[expert]
            gate, up = mm(xb, gu, group, gu_sz).chunk(2, dim=-1)
            total += weight * mm(SILU(gate) * up, dn, group, dn_sz).float()
        return total

    i, h = layout.intermediate, layout.hidden
    return step, int4pack_bytes(2 * i, h, group) + int4pack_bytes(h, i, group)


def torch_int4_batched(layout: ExpertLayout, rows: torch.Tensor, group: int, sets: list[list[int]]) -> Step:
    """Each set's k experts as one gate/up matrix [k*2I, H] and one down matrix [H, k*I]: two calls a token.
    The packs are built ahead for the sets the tokens use; gathering them at run time is not timed."""
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    gate_up_all, down_all = unpack_experts(layout, rows, torch.float32)
    packs = {}
    for experts in sets:
        gate_up = int4pack(gate_up_all[experts].reshape(-1, layout.hidden), group)
        down = int4pack(torch.cat(list(down_all[experts]), dim=1), group)
        packs[tuple(experts)] = (gate_up, down)

    def step(x: torch.Tensor, experts: list[int], weights: list[float]) -> torch.Tensor:
        (gu, gu_sz), (dn, dn_sz) = packs[tuple(experts)]
        k = len(experts)
        gate, up = mm(x.to(torch.bfloat16), gu, group, gu_sz).view(k, 2, -1).unbind(1)
        hidden = SILU(gate) * up * torch.tensor(weights, dtype=torch.bfloat16).unsqueeze(-1)
        return mm(hidden.reshape(1, -1), dn, group, dn_sz).float()

    return step


# --- c: torchao --------------------------------------------------------------------------------------------


def torchao_int4(layout: ExpertLayout, rows: torch.Tensor, group: int, kind: str) -> tuple[Step, int]:
    """kind "weight-only": int4 weights, bf16 activations (the same aten kernel as b, through torchao's tensor
    subclass); "da8w4": int8 dynamic activations, int4 weights (torchao's own C++ CPU kernel)."""
    from torchao.prototype.quantization.int4.inference_workflow import (
        Int8DynamicActivationInt4WeightConfig,
        PrototypeInt4WeightOnlyConfig,
    )
    from torchao.quantization import quantize_

    experts = torch.nn.ModuleList()
    for row in rows:
        gate_up, down = unpack_experts(layout, row.unsqueeze(0), torch.bfloat16)
        pair = torch.nn.ModuleList(
            [torch.nn.Linear(layout.hidden, 2 * layout.intermediate, bias=False, dtype=torch.bfloat16),
             torch.nn.Linear(layout.intermediate, layout.hidden, bias=False, dtype=torch.bfloat16)]
        )  # fmt: skip
        pair[0].weight.data.copy_(gate_up[0])
        pair[1].weight.data.copy_(down[0])
        experts.append(pair)
    config = (
        PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
        if kind == "weight-only"
        else Int8DynamicActivationInt4WeightConfig(group_size=group, set_inductor_config=False)
    )
    quantize_(experts, config)

    @torch.inference_mode()
    def step(x: torch.Tensor, ids: list[int], weights: list[float]) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        total = torch.zeros((1, layout.hidden), dtype=torch.float32)
        for expert, weight in zip(ids, weights, strict=True):
            gate, up = experts[expert][0](xb).chunk(2, dim=-1)
            total += weight * experts[expert][1](SILU(gate) * up).float()
        return total

    i, h = layout.intermediate, layout.hidden
    return step, int4pack_bytes(2 * i, h, group) + int4pack_bytes(h, i, group)


# --- d: kt-kernel ------------------------------------------------------------------------------------------


class _UnpinnedTorch:
    """torch, with `pin_memory` dropped: kt-kernel's wrapper pins its buffers, which a CPU-only torch cannot."""

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name in ("zeros", "empty", "full"):
            return lambda *args, **kwargs: value(*args, **{k: v for k, v in kwargs.items() if k != "pin_memory"})
        return value


def kt_kernel_llamafile(layout: ExpertLayout, rows: torch.Tensor, folder: Path) -> tuple[Step, int]:
    """kt-kernel's CPU MoE operator (`KTMoEWrapper`, method LLAMAFILE) over the pool's experts as GGUF Q4_0
    (blocks of 32: 4.5 bits a weight, as NF4), written to `folder`. MOE_INT4 is tried first."""
    import gguf
    import kt_kernel
    from kt_kernel import KTMoEWrapper, experts_base
    from kt_kernel.utils import moe_kernel

    if not moe_kernel._HAS_INT4_SUPPORT:
        print(f"kt-kernel: MOE_INT4 is not compiled into its {kt_kernel.__cpu_variant__} variant; using LLAMAFILE")
    experts_base.torch = _UnpinnedTorch()  # type: ignore[assignment]
    os.environ["KT_FORCE_SYNC_SUBMIT"] = "1"  # no CUDA stream to hang the CPU task on: submit, then wait
    gate_up, down = unpack_experts(layout, rows, torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "experts.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3next")
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    for name, weight in (
        ("gate", gate_up[:, : layout.intermediate]),
        ("up", gate_up[:, layout.intermediate :]),
        ("down", down),
    ):
        packed = gguf.quants.quantize(weight.contiguous().numpy(), q4_0)
        writer.add_tensor(f"blk.0.ffn_{name}_exps.weight", packed, raw_shape=packed.shape, raw_dtype=q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    wrapper = KTMoEWrapper(
        layer_idx=0,
        num_experts=rows.shape[0],
        num_experts_per_tok=TOP_K,
        hidden_size=layout.hidden,
        moe_intermediate_size=layout.intermediate,
        gpu_experts_mask=None,
        cpuinfer_threads=torch.get_num_threads(),
        threadpool_count=1,
        weight_path=str(path),
        chunked_prefill_size=16,
        method="LLAMAFILE",
    )
    wrapper.load_weights()

    def step(x: torch.Tensor, experts: list[int], weights: list[float]) -> torch.Tensor:
        ids = torch.tensor([experts], dtype=torch.long)
        routing = torch.tensor([weights], dtype=torch.float32)
        return wrapper.forward(x.to(torch.bfloat16), ids, routing, 0).float()

    return step, layout.gate_up_numel // 32 * 18 + layout.down_numel // 32 * 18


# --- the run -----------------------------------------------------------------------------------------------


def time_step(step: Step, pool: int, tokens: int, seed: int) -> tuple[list[float], torch.Tensor]:
    """ms per expert-token for each of `tokens` tokens (a random top-k of the pool each), and the first
    token's output (the same token and experts for every candidate: outputs compare)."""
    time.sleep(0.3)  # the previous candidate's threads stop spinning first
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, HIDDEN, generator=generator)
    weights = (torch.rand(TOP_K, generator=generator) / TOP_K).tolist()
    first = step(x, list(range(TOP_K)), weights)
    times = []
    for _ in range(tokens):
        experts = torch.randperm(pool, generator=generator)[:TOP_K].tolist()
        start = time.perf_counter()
        step(x, experts, weights)
        times.append((time.perf_counter() - start) * 1000 / TOP_K)
    return times, first


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "p10_ms": ordered[len(ordered) // 10],
        "p90_ms": ordered[(len(ordered) * 9) // 10],
        "samples": len(ordered),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pool", type=int, default=48, help="experts each candidate cycles through (> cache)")
    parser.add_argument("--tokens", type=int, default=40, help="tokens timed per candidate per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all candidates, in order")
    parser.add_argument("--groups", default="32,64,128", help="group sizes for torch's int4 layout")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layout = ExpertLayout(HIDDEN, INTERMEDIATE, "nf4")
    groups = [int(g) for g in args.groups.split(",")]
    rows = nf4_pool(layout, args.pool, distinct=8)
    x_probe = torch.randn(1, HIDDEN)
    print(f"{cpu_model()}, {args.threads} threads, pool of {args.pool} experts ({rows.numel() / _MIB:.0f} MiB)")

    # name -> (one round of its tokens: ms per expert-token each, and the first token's output; weight bytes)
    timers: dict[str, tuple[Callable[[int], tuple[list[float], torch.Tensor | None]], int]] = {}
    notes: dict[str, str] = {}

    def in_process(step: Step) -> Callable[[int], tuple[list[float], torch.Tensor | None]]:
        return lambda round_index: time_step(step, args.pool, args.tokens, seed=round_index)

    timers["a. bitsandbytes dequantize, then multiply"] = (in_process(_dequantize_step(layout, rows)), layout.row_bytes)
    for group in groups:
        step, expert_bytes = torch_int4_loop(layout, rows, group)
        timers[f"b. torch int4pack_mm, group {group}, loop"] = (in_process(step), expert_bytes)
    best_group = 64 if 64 in groups else groups[0]
    batch_sets = [list(range(s * TOP_K, (s + 1) * TOP_K)) for s in range(args.pool // TOP_K)]
    batched = torch_int4_batched(layout, rows, best_group, batch_sets)
    timers[f"b. torch int4pack_mm, group {best_group}, batched (gather not timed)"] = (
        lambda _: (_time_batched(batched, batch_sets, args.tokens, x_probe), None),
        timers[f"b. torch int4pack_mm, group {best_group}, loop"][1],
    )
    for kind in ("weight-only", "da8w4"):
        name = f"c. torchao {kind} (Int4OpaqueTensor), group {best_group}"
        try:
            step, expert_bytes = torchao_int4(layout, rows, best_group, kind)
            step(x_probe, list(range(TOP_K)), [1.0] * TOP_K)
            timers[name] = (in_process(step), expert_bytes)
        except Exception as error:  # a failure beside this torch is the finding
            notes[name] = _failure(error)
    # d's worker pool keeps spinning once started, so each of its rounds runs in a process of its own.
    timers["d. kt-kernel KTMoEWrapper LLAMAFILE (GGUF Q4_0)"] = (
        lambda round_index: _in_child(_kt_kernel_round, args.pool, args.tokens, round_index, args.threads),
        layout.gate_up_numel // 32 * 18 + layout.down_numel // 32 * 18,
    )
    for isa in host_isas():  # each build the host runs: AVX2, AVX-512 VNNI
        matvec = int4_extension.load_nf4_matvec(isa)
        if matvec is not None and CpuExpertKernel.covers(layout):
            timers[f"e. CpuExpertKernel ({isa}, NF4 rows in place)"] = (
                in_process(_kernel_step(CpuExpertKernel(layout, matvec), rows)),
                layout.row_bytes,
            )
    if not any(name.startswith("e.") for name in timers):
        notes["e. CpuExpertKernel"] = "not available on this host (no AVX2 or no compiler)"

    bandwidth: list[float] = []
    read_bandwidth: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in timers}
    outputs: dict[str, torch.Tensor | None] = {}
    for round_index in range(args.rounds):
        bandwidth += copy_bandwidth_gbps()
        read_bandwidth += read_bandwidth_gbps()
        for name, (run_round, _) in timers.items():
            if name in notes:
                continue
            try:
                measured, outputs[name] = run_round(round_index)
            except Exception as error:  # a failure beside this torch is the finding
                notes[name] = _failure(error)
                continue
            times[name] += measured
    gbps = statistics.median(bandwidth)

    baseline = outputs["a. bitsandbytes dequantize, then multiply"]
    assert baseline is not None
    results = []
    for name, (_, expert_bytes) in timers.items():
        output = outputs.get(name)
        if name in notes or output is None and not times[name]:
            continue
        cosine = None
        if output is not None:
            cosine = torch.nn.functional.cosine_similarity(output.flatten(), baseline.flatten(), dim=0).item()
        results.append(_row(name, summary(times[name]), expert_bytes, gbps, cosine))

    report = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "shapes": {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "top_k": TOP_K, "pool": args.pool},
        "copy_bandwidth_gbps": {"median": gbps, "min": min(bandwidth), "max": max(bandwidth)},
        "read_bandwidth_gbps": {"median": statistics.median(read_bandwidth), "min": min(read_bandwidth)},
        "load_average_1min": os.getloadavg()[0],
        "candidates": results,
        "not_timed": notes,
    }
    _print(report)
    write_cpu_report(report, "cpu_experts", args.out)
    return report


def _kt_kernel_round(pool: int, tokens: int, seed: int, threads: int) -> tuple[list[float], torch.Tensor]:
    """One round of d: the same pool (same seed) and tokens as the other candidates."""
    torch.set_num_threads(threads)
    layout = ExpertLayout(HIDDEN, INTERMEDIATE, "nf4")
    rows = nf4_pool(layout, pool, distinct=8)
    with tempfile.TemporaryDirectory() as folder:  # the operator keeps what it needs in memory
        step, _ = kt_kernel_llamafile(layout, rows, Path(folder))
        return time_step(step, pool, tokens, seed)


def _in_child(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _failure(error: Exception) -> str:
    return f"does not run: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def _dequantize_step(layout: ExpertLayout, rows: torch.Tensor) -> Step:
    def step(x: torch.Tensor, experts: list[int], weights: list[float]) -> torch.Tensor:
        total = torch.zeros((1, layout.hidden), dtype=torch.float32)
        for expert, weight in zip(experts, weights, strict=True):
            total += weight * dequantized_expert_forward(layout, rows[expert], x, SILU)
        return total

    return step


def _kernel_step(kernel: CpuExpertKernel, rows: torch.Tensor) -> Step:
    return lambda x, experts, weights: kernel.forward(rows, experts, weights, x, SILU)


def _time_batched(step: Step, sets: list[list[int]], tokens: int, x: torch.Tensor) -> list[float]:
    weights = [1.0 / TOP_K] * TOP_K
    step(x, sets[0], weights)
    times = []
    for token in range(tokens):
        start = time.perf_counter()
        step(x, sets[token % len(sets)], weights)
        times.append((time.perf_counter() - start) * 1000 / TOP_K)
    return times


def _row(name: str, stats: dict, expert_bytes: int, gbps: float, cosine: float | None) -> dict:
    achieved = expert_bytes / (stats["median_ms"] / 1000) / 1e9
    return {
        "candidate": name,
        **stats,
        "weight_bytes_per_expert": expert_bytes,
        "achieved_gbps": achieved,
        "share_of_bandwidth": achieved / gbps,
        "cosine_vs_baseline": cosine,
    }


def _print(report: dict) -> None:
    bw = report["copy_bandwidth_gbps"]
    print(
        f"\ncopy bandwidth: {bw['median']:.1f} GB/s (min {bw['min']:.1f}, max {bw['max']:.1f}); read only: "
        f"{report['read_bandwidth_gbps']['median']:.1f} GB/s; load average {report['load_average_1min']:.2f}"
    )
    print(f"{'candidate':<62} {'ms/expert-token':>15} {'p10-p90':>13} {'MiB/expert':>10} {'share':>6} {'cos':>8}")
    for row in report["candidates"]:
        spread = f"{row['p10_ms']:.3f}-{row['p90_ms']:.3f}"
        cosine = "" if row["cosine_vs_baseline"] is None else f"{row['cosine_vs_baseline']:.5f}"
        print(
            f"{row['candidate']:<62} {row['median_ms']:>15.3f} {spread:>13} "
            f"{row['weight_bytes_per_expert'] / _MIB:>10.2f} {row['share_of_bandwidth']:>6.0%} {cosine:>8}"
        )
    for name, why in report["not_timed"].items():
        print(f"{name}: {why}")


if __name__ == "__main__":
    main()
