#!/usr/bin/env bash
# Makes bench/.venv for the peer benchmarks (bench/peers/*.py): torch, onnx, onnxruntime, numpy,
# pillow and safetensors from PyPI, every package pinned in requirements.txt. Not part of CI.
# Usage: bash bench/peers/setup.sh   (BENCH_VENV=DIR and PYTHON=python3.X to change them)
#
# PyPI's only Linux x86-64 torch wheel is the CUDA build, and its metadata pulls ~4 GB more of
# CUDA packages (cuda-toolkit, cuDNN, NCCL, triton, cuda-bindings, ...); the CPU-only wheels are
# on PyTorch's own index, which is not reachable here. The wheel's libraries name a set of
# CUDA runtime libraries as DT_NEEDED (readelf -d torch/lib/*.so), so those must be installed
# for `import torch` even on a CPU-only machine, but nothing else is. So everything goes in
# with --no-deps from the pinned list: torch, its pure-Python dependencies and exactly those
# CUDA libraries, leaving out triton, cuda-bindings, cuSOLVER, NVTX and the toolkit metapackage.
# The venv comes to about 4.2 GB (2.7 GB of it CUDA libraries that stay unused).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${BENCH_VENV:-$here/../.venv}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps \
    -r "$here/requirements.txt"

"$venv/bin/python" - <<'PY'
import numpy, onnx, onnxruntime, PIL, safetensors, torch
torch.nn.functional.conv2d(torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3))
print(f"ok: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, "
      f"numpy {numpy.__version__}, pillow {PIL.__version__}, safetensors {safetensors.__version__}")
PY
echo "venv ready: $venv ($(du -sh "$venv" | cut -f1)); run: cargo run --release -- bench"
