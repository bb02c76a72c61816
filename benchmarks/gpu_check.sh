#!/usr/bin/env bash
# The one prepared run for a session that has a lent GPU (about 5 minutes on an H100/H200):
#   1. the offload engine's cache and equivalence tests on CUDA (streams, events, page-locked rows, bnb's CUDA
#      dequantize, misses computed on the CPU) against transformers, on the tiny Qwen3-Next;
#   2. benchmarks/moe_offload_gpu.py at Qwen3-Next-80B-A3B's real shapes, 16 GB cap, with the naive baseline;
#   3. the cost model beside what was measured.
# Here first: benchmarks/gpu_wheels.sh. Then the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
# Output goes to $OUT (the device tool's folder that comes back), else benchmarks/results/gpu-check/.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
    python3 -c "import torch, transformers, bitsandbytes, os
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| bitsandbytes', bitsandbytes.__version__, '| cpu', torch.backends.cpu.get_cpu_capability(), os.cpu_count(), 'cores')"
    echo "## 1. CUDA correctness (tiny Qwen3-Next)"
    MOE_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider \
        tests/worker/moe_offload/test_expert_cache.py tests/worker/moe_offload/test_equivalence.py
    echo "## 2. real shapes, 16 GB cap"
    timeout "${BENCH_TIMEOUT_S:-330}" python3 -m benchmarks.moe_offload_gpu --tokens "${TOKENS:-32}" \
        --out "$OUT/moe_offload_gpu.json"
    echo "## 3. cost model"
    python3 -m benchmarks.moe_cost_model --measured "$OUT/moe_offload_gpu.json"
} 2>&1 | tee "$OUT/gpu_check.log"
