#!/usr/bin/env bash
# The prepared runs for a session that has a lent GPU. Here first: benchmarks/gpu_wheels.sh. Then the device tool,
# in two calls (the first finds what breaks cheaply, before the long one) or one:
#   run(command="bash benchmarks/gpu_check.sh quick", carry=[".whl"], timeout_s=160)  # ~2 min: probe, CUDA tests
#   run(command="bash benchmarks/gpu_check.sh bench", carry=[".whl"], timeout_s=450)  # ~7 min: the benchmarks
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=580)        # both, time boxes cut
# Part quick:
#   0. benchmarks/zero_copy_probe.py: the expert kernels reading rows from GPU memory, from mapped host memory,
#      and after copying them in (what a decode step without graph breaks stands on);
#   1. the CUDA tests: the compiled decodes (host path: CUDA graphs around the experts' graph breaks; graph
#      path: one graph) against the eager one, the Triton kernels (table mode over mapped host memory).
# Part bench (a fresh machine compiles everything cold: the first compiled variant of a process took 57-86 s
# on an H100, and over 170 s for the host path with flash-linear-attention, whose one try was cut off):
#   2. benchmarks/moe_offload_gpu.py at Qwen3-Next-80B-A3B's real shapes, 16 GB cap, with flash-linear-attention's
#      Gated DeltaNet kernels (what a GPU install runs): the decode step kept on the device (EXPERT_DECODE=graph:
#      one CUDA graph a token, misses gathered from host RAM; 29.6 tok/s on an H100, run 3) with LRU refills,
#      LFU refills and none, then the rest of the model alone (32.4-35.1 tok/s, runs 1 and 3);
#   2b. the same with transformers' reference DeltaNet (the graph step compiled in 103 s): graph path (31.2
#      tok/s, run 3) against the host-path compiled decode (10.3 tok/s, run 2; its run-3 try ran out of memory
#      behind the graph variant, fixed since);
#   3. the cost model beside what was measured.
# Each benchmark's JSON is rewritten after every variant, so a run cut off keeps what it measured.
# Output goes to $OUT (the device tool's folder that comes back), else benchmarks/results/gpu-check/.
set -uo pipefail
PART=${1:-main}
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
# perf_hints: why a compiled graph was not CUDA-graphed (a layer left eager past dynamo's recompile limit is
# warned about anyway; the benchmark's JSON counts graphs, breaks and frames)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCH_LOGS=${TORCH_LOGS:-perf_hints}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fla-site \
        .whl/fla/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
bench() {  # benchmark arguments...
    timeout "${BENCH_TIMEOUT_S:-330}" python3 -m benchmarks.moe_offload_gpu --tokens "${TOKENS:-32}" "$@"
    local status=$?
    # A run cut off mid-compile leaves inductor's compile workers busy on every core: the next run's host-bound
    # timings would pay for them (seen on an H100, 2026-11-26: dequantize-then-multiply timed 6x slower).
    pkill -f torch._inductor.compile_worker && sleep 2
    return $status
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
    python3 -c "import torch, transformers, bitsandbytes, triton, os
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| bitsandbytes', bitsandbytes.__version__, '| triton', triton.__version__,
      '| cpu', torch.backends.cpu.get_cpu_capability(), os.cpu_count(), 'cores')"
    # Time-boxed step by step (a lent machine gives 15 minutes in all); variant lists and boxes can be set from
    # outside.
    if [ "$PART" != bench ]; then
        echo "## 0. zero-copy probe"
        timeout "${PROBE_TIMEOUT_S:-35}" python3 -m benchmarks.zero_copy_probe --out "$OUT/zero_copy_probe.json"
        echo "## 1. CUDA correctness (tiny Qwen3-Next)"
        MOE_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT_S:-100}" python3 -m pytest -q -p no:cacheprovider -p no:logging \
            -k "${TESTS_K:-compiled_decode or graph_decode or triton_experts}" tests/worker/moe_offload/test_engine.py \
            ${TESTS-tests/worker/moe_offload/test_triton_experts.py}
    fi
    if [ "$PART" != quick ]; then
        echo "## 2. real shapes, 16 GB cap, flash-linear-attention kernels for Gated DeltaNet"
        PYTHONPATH=/tmp/fla-site:$PYTHONPATH python3 -c "import fla; print('fla', fla.__version__)"
        PYTHONPATH=/tmp/fla-site:$PYTHONPATH BENCH_TIMEOUT_S=${FLA_TIMEOUT_S:-250} bench --skip-naive \
            --variants "${FLA_VARIANTS:-lru:compiled:graph,lfu+prefetch:compiled:graph,lru:compiled:graph:norefill,no-experts:compiled}" \
            --out "$OUT/moe_offload_gpu-fla.json"
        echo "## 2b. real shapes, 16 GB cap, transformers' reference Gated DeltaNet"
        BENCH_TIMEOUT_S=${MAIN_TIMEOUT_S:-150} bench --out "$OUT/moe_offload_gpu.json" --skip-naive \
            --variants "${MAIN_VARIANTS:-lru:compiled:graph,lru+prefetch:compiled}"
        # zero-copy share: the probe's GB/s for 10 experts over the run's host-to-device GB/s (ZERO_COPY_SHARE
        # where the probe ran in an earlier call)
        echo "## 3. cost model"
        share=${ZERO_COPY_SHARE:-$(python3 -c "import json, sys
probe, run = (json.load(open(path)) for path in sys.argv[1:])
print(probe['runs'][-1]['zero_copy_gb_per_s'] / run['h2d_gb_per_s'])" "$OUT/zero_copy_probe.json" \
            "$OUT/moe_offload_gpu.json" 2>/dev/null)}
        python3 -m benchmarks.moe_cost_model --measured "$OUT/moe_offload_gpu.json" ${share:+--zero-copy-share "$share"}
    fi
} 2>&1 | tee "$OUT/gpu_check-$PART.log"
