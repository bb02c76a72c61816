#!/usr/bin/env bash
# Build llama.cpp's llama-bench with CUDA on a machine without a GPU (the GPU machine may have no network), for
# benchmarks/llama_cpp_gpu.py: the CUDA compiler and libraries come from NVIDIA's pip wheels, the source is the
# llama.cpp that a llama-cpp-python release vendors (LLAMA_CPP_PYTHON: 0.3.36, what cpu_decode.py ran).
# Output, ignored by git: .llama/ (llama-bench and its shared libraries) and .llama.tar.xz (the same, packed).
# It runs where libcudart.so.13 and libcublas.so.13 are on LD_LIBRARY_PATH (a CUDA 13 PyTorch install has
# them); without a GPU it runs on the CPU.
#   bash benchmarks/llama_cpp_cuda_build.sh        # CUDA_ARCHS=90 (H100/H200); e.g. "89;120" for RTX 40/50 cards
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
CUDA=${CUDA:-13.0.88}
CUDA_RUNTIME=${CUDA_RUNTIME:-13.0.96}
CUBLAS=${CUBLAS:-13.0.2.14}
CCCL=${CCCL:-13.0.85}
WORK=${WORK:-/tmp/llama-cpp-cuda}
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK"
if [ ! -x "$WORK/cuda/nvidia/cu13/bin/nvcc" ]; then
    "$PY" -m pip install --quiet --no-deps --target "$WORK/cuda" "nvidia-cuda-nvcc==$CUDA" "nvidia-cuda-crt==$CUDA" \
        "nvidia-nvvm==$CUDA" "nvidia-cuda-runtime==$CUDA_RUNTIME" "nvidia-cublas==$CUBLAS" "nvidia-cuda-cccl==$CCCL"
fi
toolkit=$WORK/cuda/nvidia/cu13
# nvcc looks for its libraries in lib64 and for unversioned names
[ -e "$toolkit/lib64" ] || ln -s lib "$toolkit/lib64"
for lib in cudart cublas cublasLt; do ln -sf "lib$lib.so.13" "$toolkit/lib/lib$lib.so"; done
if [ ! -d "$WORK/src" ]; then
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar xzf "$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$WORK"
    mv "$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" "$WORK/src"
fi
# No CUDA driver library to link against here: GGML_CUDA_NO_VMM (the memory pool without virtual memory).
# FLASH_ATTENTION=OFF by default: its kernel instances add roughly 20 minutes on two cores; decode
# at short context hardly uses it (results record which build ran).
# The CPU backend twice: for any x86-64 with AVX2 (what runs here, wherever that is), and with AVX-512 in
# .llama/avx512/, which llama_cpp_gpu.py puts first where the CPU has it. Not the native build: it can pick
# instructions a VM lists but cannot run, and the GPU machine's CPU is not this one.
avx512=(-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON)
configure() {  # AVX-512 flags ON or OFF
    cmake -S "$WORK/src" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" -DCMAKE_CUDA_COMPILER="$toolkit/bin/nvcc" \
        -DCUDAToolkit_ROOT="$toolkit" -DGGML_CUDA_NO_VMM=ON -DGGML_CUDA_NCCL=OFF \
        -DGGML_CUDA_FA="${FLASH_ATTENTION:-OFF}" \
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "${avx512[@]/=ON/=$1}" \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$toolkit/lib"  # cuBLAS, which libggml-cuda needs, for the link
}
configure OFF
cmake --build "$WORK/build" --target llama-bench -j "$(nproc)"
rm -rf .llama && mkdir -p .llama/avx512
cp -a "$WORK"/build/bin/llama-bench "$WORK"/build/bin/*.so* .llama/
configure ON  # rebuilds the CPU backend alone
cmake --build "$WORK/build" --target ggml-cpu -j "$(nproc)"
cp -a "$WORK"/build/bin/libggml-cpu.so* .llama/avx512/
strip --strip-unneeded .llama/llama-bench .llama/*.so.* .llama/avx512/*.so.*
echo "llama.cpp of llama-cpp-python $LLAMA_CPP_PYTHON; CUDA $CUDA, archs ${CUDA_ARCHS:-90}, flash attention ${FLASH_ATTENTION:-OFF}" \
    > .llama/BUILD
# The same, packed for a machine the folder would be too large to copy to (about 30 MB against 57):
# gpu_check.sh unpacks it into .llama/ where that is missing.
tar cJf .llama.tar.xz -C .llama .
for ignored in /.llama/ /.llama.tar.xz; do
    grep -qx "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
du -sh .llama .llama.tar.xz
