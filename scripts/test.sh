#!/usr/bin/env bash
# Install clusca-trt with its test extras and run the test suite (CPU; tests/gpu skip without CUDA/TensorRT).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # the CPU build; an unpinned torch pulls a multi-GB CUDA build
python -m pip install -q -e ".[test,bench,serve]"
# one worker per core (pytest-xdist); a worker takes whole test files, the serve tests share one
python -m pytest -q -n auto --dist loadgroup "$@"
