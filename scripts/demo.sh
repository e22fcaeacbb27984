#!/usr/bin/env bash
# Install clusca-trt and run the main job on the built-in default model: build engines, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
clusca-trt build --out engines/default
clusca-trt generate engines/default --class-labels 0,1,2,3 --seed 0 --out out/samples.npz
clusca-trt inspect engines/default
