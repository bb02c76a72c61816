#!/usr/bin/env bash
# The prepared run for a session that has a lent GPU. Here first: benchmarks/gpu_wheels.sh. Then the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)      # ~9 min, each step time-boxed
#   run(command="bash benchmarks/gpu_check.sh tests", carry=[".whl"], timeout_s=150)  # the tests alone
# In order:
#   2. benchmarks/moe_offload_gpu.py at Qwen3-Next-80B-A3B's real shapes, 16 GB cap, most telling first (the JSON
#      is rewritten after each): eager decode as the H200 runs of 2026-11-26 had it (dequantize, then multiply),
#      compiled with the Triton kernels, the rest of the model alone compiled, compiled without the kernels, eager
#      with the kernels, compiled without prefetch, compiled without CUDA graphs, and the naive baseline;
#   3. the cost model beside what was measured;
#   2b. the same benchmark with flash-linear-attention's Triton kernels for the Gated DeltaNet layers;
#   1. the offload engine's cache and equivalence tests on CUDA (streams, events, page-locked rows, bnb's CUDA
#      dequantize, misses computed on the CPU) against transformers, on the tiny Qwen3-Next; the Triton expert
#      kernels against dequantize-then-multiply; the compiled decode (CUDA graphs around the experts' graph
#      breaks) against the eager one.
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
    # One call, time-boxed step by step (a lent machine gives 15 minutes in all): the numbers first, each JSON
    # rewritten after every variant, then the CUDA tests. Variant lists and time boxes can be set from outside.
    if [ "$PART" != tests ]; then
        echo "## 2. real shapes, 16 GB cap, flash-linear-attention kernels for Gated DeltaNet"
        PYTHONPATH=/tmp/fla-site:$PYTHONPATH python3 -c "import fla; print('fla', fla.__version__)"
        PYTHONPATH=/tmp/fla-site:$PYTHONPATH BENCH_TIMEOUT_S=${FLA_TIMEOUT_S:-200} bench --skip-naive \
            --variants "${FLA_VARIANTS:-lru+prefetch:compiled,lru+prefetch:dequant,no-experts:compiled,lru:compiled}" \
            --out "$OUT/moe_offload_gpu-fla.json"
        echo "## 2b. real shapes, 16 GB cap, transformers' reference Gated DeltaNet"
        BENCH_TIMEOUT_S=${MAIN_TIMEOUT_S:-200} bench --out "$OUT/moe_offload_gpu.json" \
            --variants "${MAIN_VARIANTS:-lru+prefetch:compiled,lru+prefetch:compiled:dequant,lru+prefetch:dequant}"
        echo "## 3. cost model"
        python3 -m benchmarks.moe_cost_model --measured "$OUT/moe_offload_gpu-fla.json"
    fi
    echo "## 1. CUDA correctness (tiny Qwen3-Next)"
    MOE_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT_S:-110}" python3 -m pytest -q -x -p no:cacheprovider \
        tests/worker/moe_offload/test_engine.py -k compiled_decode ${TESTS:-tests/worker/moe_offload/test_triton_experts.py \
        tests/worker/moe_offload/test_expert_cache.py tests/worker/moe_offload/test_equivalence.py}
} 2>&1 | tee "$OUT/gpu_check-$PART.log"
