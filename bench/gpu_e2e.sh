#!/usr/bin/env bash
# The GPU path, proven: train, exact merge, GPTQ and AWQ on the GPU, served by vLLM's CUDA build through the smoke
# gate, with the planner's GPU predictions beside the measured peaks (bench/gpu_e2e.py). Needs an NVIDIA GPU.
# The Makefile's environments: .venv (torch from PyPI, a CUDA build on Linux) and .venv-vllm (upstream vllm where
# /dev/nvidia0 exists). With PYTHON set, that interpreter (one with CUDA torch and this package's extras) is used
# instead of .venv, e.g. on a machine without the package index.
#   bench/gpu_e2e.sh [OUT]        (default OUT: $OUT/gpu-e2e if $OUT is set, else /tmp/qlora-bridge-gpu-e2e)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || [ ! -e /dev/nvidia0 ]; then
    echo "gpu_e2e: no NVIDIA GPU on this machine; nothing to prove here" >&2
    exit 2
fi
dest=${1:-${OUT:+$OUT/gpu-e2e}}
dest=${dest:-/tmp/qlora-bridge-gpu-e2e}
if [ -z "${PYTHON:-}" ]; then
    make .venv/.installed
    PYTHON=.venv/bin/python
fi
if [ -z "${QLORA_BRIDGE_VLLM_PYTHON:-}" ]; then
    make .venv-vllm/.installed
fi
mkdir -p "$(dirname "$dest")"
exec "$PYTHON" bench/gpu_e2e.py --out "$dest" "${@:2}"
