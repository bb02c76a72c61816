#!/usr/bin/env bash
# The prepared run for a session that has a lent GPU. Here first: benchmarks/gpu_wheels.sh. Then the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=580)      # ~9 min, each step time-boxed
#   run(command="bash benchmarks/gpu_check.sh tests", carry=[".whl"], timeout_s=150)  # the tests alone
# In order (a fresh machine compiles everything cold: the first compiled variant of a process took 57-86 s
# on an H100, and over 170 s for the offloaded model with flash-linear-attention, whose one try was cut off):
#   0. benchmarks/zero_copy_probe.py: the expert kernels reading rows from GPU memory, from mapped host memory,
#      and after copying them in (decides whether a decode step without graph breaks can stand);
#   2. benchmarks/moe_offload_gpu.py at Qwen3-Next-80B-A3B's real shapes, 16 GB cap, transformers' reference
#      DeltaNet (compiles in about a minute): the decode step kept on the device (EXPERT_DECODE=graph: one CUDA
#      graph a token, misses read from host RAM), the host-path compiled decode beside it (10.3 tok/s on an
#      H100), the graph path without refills; each JSON is rewritten after every variant;
#   2b. the same with flash-linear-attention's Gated DeltaNet kernels (what a GPU install would run): the graph
#      path, the rest of the model alone;
#   3. the cost model beside what was measured;
#   1. the CUDA tests: the compiled decodes (host path: CUDA graphs around the experts' graph breaks; graph
#      path: one graph) against the eager one, then (TESTS= to skip them) the Triton kernels, the cache and the
#      equivalence tests.
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
    # One call, time-boxed step by step (a lent machine gives 15 minutes in all). Variant lists and time
    # boxes can be set from outside.
    if [ "$PART" != tests ]; then
        echo "## 0. zero-copy probe"
        timeout "${PROBE_TIMEOUT_S:-45}" python3 -m benchmarks.zero_copy_probe --out "$OUT/zero_copy_probe.json"
        echo "## 2. real shapes, 16 GB cap, transformers' reference Gated DeltaNet"
        BENCH_TIMEOUT_S=${MAIN_TIMEOUT_S:-240} bench --out "$OUT/moe_offload_gpu.json" --skip-naive \
            --variants "${MAIN_VARIANTS:-lru:compiled:graph,lru+prefetch:compiled,lfu+prefetch:compiled:graph,lru:compiled:graph:norefill}"
        echo "## 2b. real shapes, 16 GB cap, flash-linear-attention kernels for Gated DeltaNet"
        PYTHONPATH=/tmp/fla-site:$PYTHONPATH python3 -c "import fla; print('fla', fla.__version__)"
        PYTHONPATH=/tmp/fla-site:$PYTHONPATH BENCH_TIMEOUT_S=${FLA_TIMEOUT_S:-200} bench --skip-naive \
            --variants "${FLA_VARIANTS:-lru:compiled:graph,no-experts:compiled}" --out "$OUT/moe_offload_gpu-fla.json"
        echo "## 3. cost model (zero-copy share: the probe's GB/s for 10 experts over the run's host-to-device GB/s)"
        share=$(python3 -c "import json, sys
probe, run = (json.load(open(path)) for path in sys.argv[1:])
print(probe['runs'][-1]['zero_copy_gb_per_s'] / run['h2d_gb_per_s'])" "$OUT/zero_copy_probe.json" \
            "$OUT/moe_offload_gpu.json" 2>/dev/null)
        python3 -m benchmarks.moe_cost_model --measured "$OUT/moe_offload_gpu.json" ${share:+--zero-copy-share "$share"}
    fi
    echo "## 1. CUDA correctness (tiny Qwen3-Next)"
    MOE_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT_S:-60}" python3 -m pytest -q -p no:cacheprovider -p no:logging \
        tests/worker/moe_offload/test_engine.py -k "compiled_decode or graph_decode" ${TESTS-tests/worker/moe_offload/test_triton_experts.py \
        tests/worker/moe_offload/test_expert_cache.py tests/worker/moe_offload/test_equivalence.py}
} 2>&1 | tee "$OUT/gpu_check-$PART.log"
