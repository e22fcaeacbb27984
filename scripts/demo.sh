#!/usr/bin/env bash
# Install clusca-trt and run the main job on the built-in default model (dit-digits, trained):
# build engines, generate digits, compare full / ClusCa / FORA / TaylorSeer side by side, inspect.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
clusca-trt build --out engines/default      # no --model: the built-in, trained dit-digits
clusca-trt generate engines/default --class-labels 0,1,2,3,4,5,6,7,8,9 --seed 0 --out out/samples.npz
clusca-trt generate engines/default --compare --class-labels 0,1,2,3,4,5,6,7,8,9 --seed 0 --out out/compare.png
clusca-trt inspect engines/default
