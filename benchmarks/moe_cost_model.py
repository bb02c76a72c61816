"""Predict the offload engine's decode tok/s from a few measured times, and set it beside a GPU run.

Per token, each of the L MoE layers routes to k experts; a fraction h of them is already in a device slot.
  misses       m = k (1 - h)
  copy path    the hits compute while the misses cross the bus, then the misses compute:
               t_layer = max(m * t_copy, (k - m) * t_gpu) + m * t_gpu + t_host
  hybrid path  some misses are copied, the rest computed on the CPU at host-RAM speed in parallel;
               the best split copies m * t_cpu / (t_copy + t_cpu) of them:
               t_layer = max(m * t_copy * t_cpu / (t_copy + t_cpu), (k - m) * t_gpu) + ... (same tail)
  graph path   (EXPERT_DECODE=graph) no host work a layer: a copy kernel gathers the misses' rows from host
               RAM over the bus, then the kernels compute all k experts from device memory:
               t_layer = m * row_bytes / (share * PCIe bandwidth) + k * t_kernel
               (share: what a kernel reading mapped host RAM draws of a copy's bandwidth, from the zero-copy
               probe). Between steps the refills copy the chosen misses (r of them a layer; LRU: every miss)
               from the step's gather scratch into slots, device to device, queued before the next step:
               t = t_dense_graph + L * t_layer + L * r * row_bytes / device copy bandwidth.
               t_dense_graph: the rest of a step that is one CUDA graph (no breaks), fitted on a graph run with
               the run's own refill bytes taken out (a run from before device-to-device refills copied them over
               the bus beside the step: nothing to take out).
  emulated bus (the benchmark's --h2d-gbps B) the engine runs at the card's own bus and then waits until its
               bytes fit B: t_emulated = t(card's bus) + bus bytes per token / B. A real bus of B GB/s would
               instead give t(B); the emulation is slower than that by about the card's own gather time.
  token        t = t_dense + L * t_layer        (t_dense: attention, DeltaNet, shared experts, lm_head)
with t_copy = row_bytes / PCIe bandwidth and t_cpu = row_bytes / host-RAM bandwidth (a 4-bit expert
matvec on the CPU is bound by reading its row). Under uniform, independent routing the hit rate is
the fraction of experts that have a slot, slots / 512 (random-weight runs hit more: consecutive tokens
route alike).

    python -m benchmarks.moe_cost_model [--measured benchmarks/results/moe_offload_gpu-<card>.json]
"""

import argparse
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from worker.engine.moe_offload.packing import ExpertLayout

_GIB = 1024**3
RESULTS = Path(__file__).parent / "results"

# Qwen3-Next-80B-A3B
LAYERS, EXPERTS, TOP_K = 48, 512, 10
ROW_BYTES = ExpertLayout(2048, 512, "nf4").row_bytes


@dataclass(frozen=True)
class Inputs:
    gpu_budget_gb: float = 16.0
    reserve_gb: float = 1.5
    resident_gb: float = 4.41  # the 2.36B non-expert parameters in bf16 (counted from the real config)
    pcie_gb_per_s: float = 25.0  # PCIe 4.0 x16, as FreeToken measured it
    host_ram_gb_per_s: float = 40.0  # what a desktop's dual-channel DDR5 gives one process
    gpu_expert_ms: float = 0.03  # dequantize + two matvecs of one expert (assumed until measured)
    dense_ms: float = 12.0  # everything but the routed experts, per token (assumed until measured)
    # Host time per MoE layer that nothing overlaps: the device-to-host sync that tells the host what to copy,
    # Python, kernel launches. Assumed until measured; an H200 run measured ~0.9 ms (decode is host-bound).
    layer_host_ms: float = 0.05
    measured_cpu_expert_ms: float | None = None  # the CPU's 4-bit matvec per expert, when a run timed it
    kernel_expert_ms: float = 0.008  # the Triton kernels, per expert of one token (H100: 78 us for 10)
    zero_copy_share: float = 0.715  # the gather kernel reading mapped host RAM, as a share of a copy's bandwidth
    graph_dense_ms: float = 12.0  # the dense part of a decode step that is one CUDA graph (assumed until measured)
    # A 16 GB card's device-to-device copy bandwidth (a copy reads and writes: about half its memory
    # bandwidth); assumed until measured on the card in question.
    d2d_gb_per_s: float = 300.0
    refill_share: float = 1.0  # of each step's misses, the share refilled into slots (LRU: all)

    @property
    def slots(self) -> int:
        free = (self.gpu_budget_gb - self.reserve_gb - self.resident_gb) * _GIB
        return max(0, min(EXPERTS, int(free // (LAYERS * ROW_BYTES))))

    @property
    def uniform_hit_rate(self) -> float:
        return self.slots / EXPERTS

    @property
    def copy_ms(self) -> float:
        return ROW_BYTES / (self.pcie_gb_per_s * 1e9) * 1000

    @property
    def cpu_expert_ms(self) -> float:
        if self.measured_cpu_expert_ms is not None:
            return self.measured_cpu_expert_ms
        return ROW_BYTES / (self.host_ram_gb_per_s * 1e9) * 1000


def layer_ms(inputs: Inputs, hit_rate: float, hybrid: bool) -> float:
    misses = TOP_K * (1 - hit_rate)
    hits_compute = (TOP_K - misses) * inputs.gpu_expert_ms
    if hybrid:
        t_copy, t_cpu = inputs.copy_ms, inputs.cpu_expert_ms
        arrival = misses * t_copy * t_cpu / (t_copy + t_cpu)
        copied = misses * t_cpu / (t_copy + t_cpu)
        tail = copied * inputs.gpu_expert_ms
    else:
        arrival = misses * inputs.copy_ms
        tail = misses * inputs.gpu_expert_ms
    return max(arrival, hits_compute) + tail + inputs.layer_host_ms


def tok_per_s(inputs: Inputs, hit_rate: float, hybrid: bool = False) -> float:
    return 1000 / (inputs.dense_ms + LAYERS * layer_ms(inputs, hit_rate, hybrid))


def graph_experts_ms(inputs: Inputs, hit_rate: float) -> float:
    """Per token, a graph decode step's routed experts: each layer's misses gathered over the bus, then its
    k experts computed."""
    gather_ms = TOP_K * (1 - hit_rate) * ROW_BYTES / (inputs.zero_copy_share * inputs.pcie_gb_per_s * 1e9) * 1000
    return LAYERS * (gather_ms + TOP_K * inputs.kernel_expert_ms)


def refill_ms(inputs: Inputs, hit_rate: float) -> float:
    """Per token, the refills: the refilled misses copied from the gather scratch into slots on the device."""
    refilled = LAYERS * TOP_K * (1 - hit_rate) * inputs.refill_share
    return refilled * ROW_BYTES / (inputs.d2d_gb_per_s * 1e9) * 1000


def graph_step_ms(inputs: Inputs, hit_rate: float) -> float:
    return inputs.graph_dense_ms + graph_experts_ms(inputs, hit_rate) + refill_ms(inputs, hit_rate)


def graph_tok_per_s(inputs: Inputs, hit_rate: float) -> float:
    """Decode with the step on the device: the dense part, the gathers and the kernels, then the refills."""
    return 1000 / graph_step_ms(inputs, hit_rate)


def bus_bytes_per_token(hit_rate: float) -> float:
    """Graph decode: each miss crosses the bus once, gathered by the step."""
    return LAYERS * TOP_K * (1 - hit_rate) * ROW_BYTES


def emulated_graph_tok_per_s(on_card: Inputs, hit_rate: float, emulated_gb_per_s: float) -> float:
    """A graph decode run on a card whose bus the benchmark holds to `emulated_gb_per_s`: the step at the card's
    own bus, then the wait until its bus bytes fit the emulated rate."""
    wait_ms = bus_bytes_per_token(hit_rate) / (emulated_gb_per_s * 1e9) * 1000
    return 1000 / (graph_step_ms(on_card, hit_rate) + wait_ms)


def experts_timed(run: dict) -> bool:
    """Whether a run timed its experts apart from the rest (a graph decode's are inside its one graph)."""
    return "graph decode" not in run.get("label", "")


def host_path_runs(report: dict) -> list[dict]:
    """The runs whose experts went through the host path and its cache (what the copy and hybrid columns are
    calibrated on)."""
    return [run for run in report["variants"] if run["hit_rate"] > 0 and experts_timed(run)]


def measured_dense_ms(report: dict) -> float | None:
    """Per token, what is not the routed experts: a decode step's time less its experts' time, at the least
    over the variants that timed their experts (a variant's first steps can be slow: warm-up); None without
    one."""
    runs = [run for run in report["variants"] if experts_timed(run)]
    return min(1000 / run["tok_per_s"] - run["expert_ms_per_token"] for run in runs) if runs else None


def run_refill_ms(run: dict, d2d_gb_per_s: float) -> float:
    """Per token, the refills a graph run copied on the device, from its own counters (none in a run from before
    device-to-device refills: its refills crossed the bus beside the step)."""
    tokens = max(1, run.get("decode_tokens", 1))
    return run.get("cache", {}).get("bytes_copied_on_device", 0) / tokens / (d2d_gb_per_s * 1e9) * 1000


def run_bus_wait_ms(run: dict) -> float:
    """Per token, what an emulated run's pacing added: its bus bytes at the emulated rate."""
    emulated = run.get("emulated")
    if not emulated:
        return 0.0
    return bus_bytes_per_token(run["hit_rate"]) / (emulated["h2d_gbps"] * 1e9) * 1000


def measured_graph_dense_ms(report: dict, on_card: Inputs) -> float | None:
    """The dense part of a one-graph decode step: a graph decode run's step less its modelled experts at the
    card's bus (`on_card`), its own refills and an emulated run's pacing, at the least over such runs; None
    without one."""
    runs = [run for run in report["variants"] if not experts_timed(run)]
    return (
        min(
            1000 / run["tok_per_s"]
            - graph_experts_ms(on_card, run["hit_rate"])
            - run_refill_ms(run, on_card.d2d_gb_per_s)
            - run_bus_wait_ms(run)
            for run in runs
        )
        if runs
        else None
    )


def predict_run(on_card: Inputs, run: dict) -> float | None:
    """What the model predicts for one measured graph run, at its hit rate, on the card's bus or the emulated
    one it ran under (None for host-path runs: their host time is fitted on them)."""
    if experts_timed(run):
        return None
    emulated = run.get("emulated")
    if emulated:
        return emulated_graph_tok_per_s(on_card, run["hit_rate"], emulated["h2d_gbps"])
    return graph_tok_per_s(on_card, run["hit_rate"])


def newest_result(root: Path = RESULTS) -> Path | None:
    """The newest non-smoke `moe_offload_gpu` JSON under `root`, its dated folders included: by the date the
    benchmark writes into it, else the date in its folder's name (`<card>-YYYY-MM-DD`), then the run's number
    prefix and name; a file with neither date counts as oldest."""

    def key(path: Path) -> tuple[str, str]:
        data = json.loads(path.read_text())
        folder_date = re.search(r"\d{4}-\d{2}-\d{2}", path.parent.name) if path.parent != root else None
        date = data.get("date") or (folder_date.group(0) if folder_date else "")
        return date[:10], path.name

    found = [p for p in root.rglob("*moe_offload_gpu*.json") if not json.loads(p.read_text()).get("smoke")]
    return max(found, key=key) if found else None


def expert_compute_ms(report: dict, run: dict) -> float:
    """One expert's compute time by the path `run` took: the Triton kernels, or dequantize-then-multiply."""
    fused = report.get("fused_expert_compute_ms")
    return fused if run.get("expert_kernel") == "triton" and fused else report["expert_compute_ms"]


def inputs_from_measurement(report: dict, budget_gb: float, zero_copy_share: float = Inputs.zero_copy_share) -> Inputs:
    host_path = host_path_runs(report)
    fastest = max(host_path or report["variants"], key=lambda run: run["tok_per_s"])
    measured = Inputs(
        gpu_budget_gb=budget_gb,
        resident_gb=report["resident_gb"],
        pcie_gb_per_s=report["h2d_gb_per_s"],
        gpu_expert_ms=expert_compute_ms(report, fastest),
        kernel_expert_ms=report.get("fused_expert_compute_ms") or Inputs.kernel_expert_ms,
        measured_cpu_expert_ms=report.get("cpu_expert_ms"),
        d2d_gb_per_s=report.get("d2d_gb_per_s") or Inputs.d2d_gb_per_s,
        layer_host_ms=0.0,
        zero_copy_share=zero_copy_share,
    )
    graph_dense = measured_graph_dense_ms(report, measured)
    host_dense = measured_dense_ms(report)
    # Each path's dense part from its own runs; where one path has none, the other's stands in (a host-path
    # step's dense part also holds the graph breaks' cost: an upper bound for a one-graph step).
    measured = replace(
        measured,
        dense_ms=host_dense if host_dense is not None else graph_dense,
        graph_dense_ms=graph_dense if graph_dense is not None else host_dense,
    )
    # What the fastest run's experts took per layer beyond the modelled copy and compute is the host's share.
    layer_host_ms = (
        fastest["expert_ms_per_token"] / LAYERS - layer_ms(measured, fastest["hit_rate"], hybrid=False)
        if host_path
        else 0.0
    )
    return replace(measured, layer_host_ms=max(0.0, layer_host_ms))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", type=Path, default=None, help="a moe_offload_gpu JSON result")
    parser.add_argument("--budget-gb", type=float, default=16.0)
    parser.add_argument("--pcie-gb-per-s", type=float, default=None)
    parser.add_argument("--host-ram-gb-per-s", type=float, default=Inputs.host_ram_gb_per_s)
    parser.add_argument(
        "--zero-copy-share",
        type=float,
        default=Inputs.zero_copy_share,
        help="what kernels reading mapped host RAM reach of a copy's bandwidth "
        "(benchmarks/zero_copy_probe.py's GB/s over the run's host-to-device GB/s)",
    )
    parser.add_argument(
        "--d2d-gb-per-s",
        type=float,
        default=Inputs.d2d_gb_per_s,
        help="the target card's device-to-device copy bandwidth, for the refills",
    )
    parser.add_argument(
        "--cpu-expert-ms",
        type=float,
        default=None,
        help="a CPU's measured time per 4-bit expert (default: the run's, else row bytes / host RAM)",
    )
    args = parser.parse_args(argv)

    measured = None
    if args.measured is None:
        args.measured = newest_result()
    if args.measured:
        measured = json.loads(args.measured.read_text())
        if measured["smoke"]:
            parser.error(f"{args.measured} is a --smoke run (tiny shapes): it says nothing about the real model")
        if not measured["variants"]:
            parser.error(f"{args.measured} holds no finished decode run")
        inputs = inputs_from_measurement(measured, args.budget_gb, args.zero_copy_share)
        shown = args.measured.relative_to(RESULTS) if args.measured.is_relative_to(RESULTS) else args.measured
        source = f"times measured on {measured['card']} ({shown})"
    else:
        inputs = Inputs(gpu_budget_gb=args.budget_gb)
        source = "assumed times (no GPU measurement committed yet)"
    on_card = inputs
    overrides = {
        "host_ram_gb_per_s": args.host_ram_gb_per_s,
        "zero_copy_share": args.zero_copy_share,
        "d2d_gb_per_s": args.d2d_gb_per_s,
    }
    if args.cpu_expert_ms is not None:
        overrides["measured_cpu_expert_ms"] = args.cpu_expert_ms
    if args.pcie_gb_per_s:
        overrides["pcie_gb_per_s"] = args.pcie_gb_per_s
    elif measured:
        overrides["pcie_gb_per_s"] = 25.0  # predict for the target bus, not the measured card's
    inputs = Inputs(**{**inputs.__dict__, **overrides})

    print(
        f"# Qwen3-Next-80B-A3B decode, {inputs.gpu_budget_gb:g} GB GPU, PCIe {inputs.pcie_gb_per_s:g} GB/s, "
        f"host RAM {inputs.host_ram_gb_per_s:g} GB/s; {source}"
    )
    print(
        f"# {inputs.slots} slots per layer; expert row {ROW_BYTES / 2**20:.2f} MiB: copy {inputs.copy_ms:.3f} ms, "
        f"CPU {inputs.cpu_expert_ms:.3f} ms, GPU {inputs.gpu_expert_ms:.3f} ms; host {inputs.layer_host_ms:.2f} ms "
        f"per MoE layer; dense part {inputs.dense_ms:.1f} ms (one-graph step: {inputs.graph_dense_ms:.1f} ms); "
        f"zero-copy share {inputs.zero_copy_share:.2f}"
    )
    rows = [
        ("uniform, independent routing", inputs.uniform_hit_rate),
        ("real routing, low skew", 0.67),
        ("real routing, high skew", 0.81),
        ("every expert a miss", 0.0),
    ]
    best = None
    if measured:
        with_experts = [run for run in measured["variants"] if run["cache"]["hits"] + run["cache"]["misses"]]
        best = max(with_experts or measured["variants"], key=lambda run: run["tok_per_s"])
        rows.insert(1, ("as measured (random weights)", best["hit_rate"]))
    # The host path's columns stand on a host-path run's timings (its per-layer host time above all); a
    # measurement without one leaves them out rather than print what nothing measured.
    host_path = measured is None or bool(host_path_runs(measured))
    print(f"| {'routing':<34} | {'hit rate':>8} | {'copy tok/s':>10} | {'hybrid tok/s':>12} | {'graph tok/s':>11} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 12}|{'-' * 14}|{'-' * 13}|")
    predictions = []
    for label, hit_rate in rows:
        copy = tok_per_s(inputs, hit_rate) if host_path else None
        hybrid = tok_per_s(inputs, hit_rate, hybrid=True) if host_path else None
        graph = graph_tok_per_s(inputs, hit_rate)
        predictions.append(
            {"routing": label, "hit_rate": hit_rate, "copy_tok_s": copy, "hybrid_tok_s": hybrid, "graph_tok_s": graph}
        )
        print(f"| {label:<34} | {hit_rate:>8.1%} | {_cell(copy):>10} | {_cell(hybrid):>12} | {graph:>11.1f} |")
    if not host_path:
        print("# copy and hybrid: no host-path run with experts in this measurement")
    if measured:
        on_card = replace(on_card, pcie_gb_per_s=measured["h2d_gb_per_s"], zero_copy_share=inputs.zero_copy_share)
        for run in measured["variants"]:
            predicted = predict_run(on_card, run)
            if predicted is not None:
                bus = f"emulated {run['emulated']['h2d_gbps']:g} GB/s" if run.get("emulated") else "card's bus"
                print(f"# {run['label']}: measured {run['tok_per_s']:.1f} tok/s, predicted {predicted:.1f} ({bus})")
    if best:
        predicted = predict_run(on_card, best)
        if predicted is None:
            predicted = tok_per_s(on_card, best["hit_rate"])
        bus = (
            f"an emulated {best['emulated']['h2d_gbps']:g} GB/s"
            if best.get("emulated")
            else f"that card's bus ({measured['h2d_gb_per_s']:.1f} GB/s)"
        )
        print(
            f"# measured on {measured['card']}: {best['tok_per_s']:.1f} tok/s ({best['label']}, hit rate "
            f"{best['hit_rate']:.1%}); the model predicts {predicted:.1f} for {bus} and hit rate"
        )
    else:
        print("# measured: none yet; run benchmarks/moe_offload_gpu.py on a GPU")
    return {"inputs": inputs.__dict__, "predictions": predictions}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
