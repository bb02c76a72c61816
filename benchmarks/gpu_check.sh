#!/usr/bin/env bash
# The GPU checks, run on a machine with a CUDA GPU from the repository root, each step time-boxed; when that
# machine has no network, fill .whl/ first with benchmarks/gpu_wheels.sh and take it along. In two runs (the
# first finds what breaks cheaply, before the long one) or one:
#   bash benchmarks/gpu_check.sh quick   # ~2 min: probe, CUDA tests
#   bash benchmarks/gpu_check.sh bench   # ~7 min: the benchmarks
#   bash benchmarks/gpu_check.sh         # both, time boxes cut
#   bash benchmarks/gpu_check.sh bus     # ~8 min, on its own: a 16 GB card's bus, emulated
#   bash benchmarks/gpu_check.sh llama   # ~4 min, on its own: llama.cpp, the peer (.llama/ or .llama.tar.xz
#                                        # from benchmarks/llama_cpp_cuda_build.sh; .whl-llama/ from
#                                        # benchmarks/gpu_wheels.sh llama)
# Part quick:
#   0. benchmarks/zero_copy_probe.py: the expert kernels reading rows from GPU memory, from mapped host memory,
#      and after copying them in (what a decode step without graph breaks stands on);
#   1. the CUDA tests: the compiled decodes (host path: CUDA graphs around the experts' graph breaks; graph
#      path: one graph) against the eager one, the Triton kernels (table mode over mapped host memory).
# Part bench (a fresh machine compiles everything cold, for minutes; benchmarks/results/README.md has the times):
#   2. benchmarks/moe_offload_gpu.py at Qwen3-Next-80B-A3B's real shapes, 16 GB cap, with flash-linear-attention's
#      Gated DeltaNet kernels (what a GPU install runs): the decode step kept on the device (EXPERT_DECODE=graph:
#      one CUDA graph a token, misses gathered from host RAM) with LRU refills, LFU refills and none, then the
#      rest of the model alone;
#   2b. the same with transformers' reference DeltaNet: graph path against the host-path compiled decode;
#   3. the cost model beside what was measured.
# Part bus (on its own; steps 4 and 5):
#   4. graph decode at real shapes, 16 GB, the whole process held to 15 GiB as NVML counts it (the run fails
#      past it): the card's own bus, then an emulated 25 GB/s (PCIe 4.0 x16) and 12.5 GB/s bus, in one process
#      so the step compiles once; tok/s the median over BUS_PROMPTS prompts of BUS_TOKENS tokens (128, not 256,
#      to fit the box; BUS_TOKENS=256 where the box allows); time to first token for 512, 2k and 8k-token
#      prompts; routing statistics; bytes over the bus and refilled on the device;
#   5. the cost model's prediction beside each of step 4's variants.
# Part llama (on its own; step 6):
#   6. llama.cpp's llama-bench on a synthetic Qwen3-Next GGUF of the real shapes (written in RAM first, under a
#      minute), each --n-cpu-moe in its own process with NVML watching it; the fastest within 15 GiB, and its
#      prompt times for 512, 2k and 8k tokens.
# Each benchmark's JSON is rewritten after every variant, so a run cut off keeps what it measured.
# Output goes to $OUT when set, else benchmarks/results/gpu-check/.
set -uo pipefail
PART=${1:-main}
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
# perf_hints: why a compiled graph was not CUDA-graphed (a layer left eager past dynamo's recompile limit is
# warned about anyway; the benchmark's JSON counts graphs, breaks and frames)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCH_LOGS=${TORCH_LOGS:-perf_hints}
WHEELS=.whl
[ "$PART" = llama ] && [ -d .whl-llama ] && WHEELS=.whl-llama  # gpu_wheels.sh llama: gguf alone
if [ -d "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    if [ -d "$WHEELS/fla" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fla-site \
            "$WHEELS"/fla/*.whl || exit 1
    fi
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
    # Time-boxed step by step, so that one stuck step cannot eat the others' time; variant lists and boxes can
    # be set from outside.
    if [ "$PART" = bus ]; then
        echo "## 4. emulated buses: graph decode at 16 GB, the card's bus, 25 GB/s, 12.5 GB/s"
        fla=/tmp/fla-site
        [ -d "$fla" ] && PYTHONPATH=$fla:$PYTHONPATH python3 -c "import fla; print('fla', fla.__version__)"
        PYTHONPATH=$fla:$PYTHONPATH BENCH_TIMEOUT_S=${BUS_TIMEOUT_S:-420} TOKENS=${BUS_TOKENS:-128} bench --skip-naive \
            --prompts "${BUS_PROMPTS:-5}" --max-model-len 8192 --ttft "${BUS_TTFT:-512,2048,8192}" \
            --variants "${BUS_VARIANTS:-lru:compiled:graph,lru:compiled:graph:h2d=25,lru:compiled:graph:h2d=12.5}" \
            --out "$OUT/moe_offload_gpu-bus.json"
        echo "## 5. cost model beside each variant"
        python3 -m benchmarks.moe_cost_model --measured "$OUT/moe_offload_gpu-bus.json" \
            ${ZERO_COPY_SHARE:+--zero-copy-share "$ZERO_COPY_SHARE"}
    fi
    if [ "$PART" = llama ]; then
        echo "## 6. llama.cpp, experts of the first N layers in host RAM, the best N within 15 GiB"
        [ ! -x .llama/llama-bench ] && [ -f .llama.tar.xz ] && mkdir -p .llama && tar xJf .llama.tar.xz -C .llama
        timeout "${LLAMA_TIMEOUT_S:-330}" python3 -m benchmarks.llama_cpp_gpu --n-cpu-moe "${LLAMA_N_CPU_MOE:-40,36,34,32}" \
            --tokens "${LLAMA_TOKENS:-128}" --repetitions "${LLAMA_REPETITIONS:-3}" --out "$OUT/llama_cpp_gpu.json" \
            ${LLAMA_ARGS:-}
    fi
    if [ "$PART" != bench ] && [ "$PART" != bus ] && [ "$PART" != llama ]; then
        echo "## 0. zero-copy probe"
        timeout "${PROBE_TIMEOUT_S:-35}" python3 -m benchmarks.zero_copy_probe --out "$OUT/zero_copy_probe.json"
        echo "## 1. CUDA correctness (tiny Qwen3-Next)"
        MOE_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT_S:-100}" python3 -m pytest -q -p no:cacheprovider -p no:logging \
            -k "${TESTS_K:-compiled_decode or graph_decode or triton_experts or device_step}" \
            tests/worker/moe_offload/test_engine.py \
            ${TESTS-tests/worker/moe_offload/test_triton_experts.py tests/worker/moe_offload/test_expert_cache.py}
    fi
    if [ "$PART" != quick ] && [ "$PART" != bus ] && [ "$PART" != llama ]; then
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
