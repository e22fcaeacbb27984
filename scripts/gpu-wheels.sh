#!/usr/bin/env bash
# Download into .whl/ (ignored by git: never commit wheels) the Python packages that scripts/gpu-check.sh
# needs and the GPU machine (one H200) lacks; the device tool carries them there: carry=[".whl"].
#
# Compared with that machine's package list (.library/device/KINDS.md, read 2026-11-17: Python 3.12,
# torch 2.11 + CUDA 13, numpy, onnx, onnxscript, onnx-ir, onnxruntime 1.30 (CPU), transformers,
# safetensors, huggingface-hub, click, pillow, ml-dtypes, sentencepiece, pytest, setuptools, wheel, ...):
#   diffusers           missing (the FLUX / DiT modules, the eager baselines); needs huggingface-hub>=1.32 (there: 1.33)
#   importlib_metadata  missing (a requirement of diffusers)
# Not carried: tensorrt, polygraphy, onnxruntime-gpu (far too big, or useless without TensorRT): the TensorRT
# and ONNX Runtime CUDA tests skip there with the reason. The project itself is built into a wheel on the
# machine by gpu-check.sh (its source travels with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0)
mkdir -p .whl
for w in "${WHEELS[@]}"; do  # one version of each: two would stop the install there
    rm -f ".whl/${w%%==*}-"*.whl
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
