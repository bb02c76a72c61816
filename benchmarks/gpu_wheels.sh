#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels an offline GPU machine lacks, at the versions of this checkout's
# venv, for its Python 3.12. Run once per checkout, before taking .whl/ to that machine for gpu_check.sh.
# `gpu_wheels.sh llama`: only what gpu_check.sh's part llama needs (gguf), in .whl-llama/, small enough to go
# with .llama.tar.xz (the full set would not fit beside it).
# Such a machine is expected to have torch (CUDA), transformers, accelerate, safetensors, tokenizers, psutil,
# nvidia-ml-py and pytest; the offload engine and its tests also import these:
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
[ "${1:-}" = llama ] && DEST=.whl-llama
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
rm -rf "$DEST" && mkdir "$DEST"
specs=()
# transformers: this checkout's, newer than the image's 5.17 (static cache and compile paths differ); regex: its
# floor is above the image's. fla/ (flash-linear-attention: Triton kernels for Gated DeltaNet) goes on the path
# only for the benchmark run that measures it, since transformers picks it up at import.
# gguf: benchmarks/llama_cpp_gpu.py writes its synthetic GGUF there.
names=(bitsandbytes pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types redis
    transformers regex gguf)
[ "${1:-}" = llama ] && names=(gguf)
for name in "${names[@]}"; do
    specs+=("$name==$("$PY" -m pip show "$name" | sed -n 's/^Version: //p')")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DEST" "${specs[@]}"
[ "${1:-}" = llama ] || "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$DEST/fla" \
    flash-linear-attention==0.6.0 fla-core==0.6.0 einops
du -sh "$DEST" && ls -R "$DEST"
