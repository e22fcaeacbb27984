#!/usr/bin/env bash
# The GPU check of issue 14 on one H200, in under 8 minutes, as one command of the device tool:
#
#     bash scripts/gpu-wheels.sh                       # here, once: the wheels the H200 lacks, into .whl/
#     run(command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=540)
#
# 1. installs the project next to the machine's PyTorch from the carried wheels (it has no network):
#    diffusers + importlib_metadata from .whl/, the project as a wheel built there from the source tree;
# 2. runs tests/gpu (the torch CUDA backend; the TensorRT and ONNX Runtime CUDA tests skip there);
# 3. benchmarks/gpu.py: DiT-XL/2 (fp32, bf16) and FLUX.1-dev size (bf16): full, ClusCa, TaylorSeer and
#    eager diffusers on the same weights; latency, speed-up, efficiency, peak memory, host syncs per sample.
#
# Writes to $OUT (what the device tool brings back; out/gpu-check here): env.txt, install.log,
# tests-gpu.log, bench.log, gpu-bench.json, gpu-bench.md. Without a GPU it runs too: the tests skip and
# the benchmark runs at tiny sizes (--tiny).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SITE=${CLUSCA_SITE:-/tmp/clusca-site}
LIMIT=${GPU_CHECK_SECONDS:-470}  # the whole script; the device tool's command limit is 600 s
start=$SECONDS

echo "== install" | tee "$OUT/install.log"
rm -rf "$SITE" /tmp/clusca-wheel
wheels=(.whl/*.whl)
if $PY -m pip wheel -q --no-deps --no-build-isolation --no-index -w /tmp/clusca-wheel . >>"$OUT/install.log" 2>&1; then
    wheels+=(/tmp/clusca-wheel/*.whl)
else
    echo "building the project's wheel failed (see install.log): the source tree is used" | tee -a "$OUT/install.log"
fi
if ((${#wheels[@]})); then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        >>"$OUT/install.log" 2>&1 || echo "installing the wheels failed (see install.log)" | tee -a "$OUT/install.log"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "== environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    $PY - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("clusca_trt", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "huggingface_hub"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} from {getattr(m, '__file__', '?')}")
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")
PY
} 2>&1 | tee "$OUT/env.txt"

echo "== tests/gpu"
timeout 200 $PY -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$OUT/tests-gpu.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark"
left=$((LIMIT - (SECONDS - start)))
args=(--out "$OUT" --budget $((left - 20)))
$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || args+=(--tiny)
timeout "$left" $PY benchmarks/gpu.py "${args[@]}" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== done in $((SECONDS - start)) s: tests/gpu exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
