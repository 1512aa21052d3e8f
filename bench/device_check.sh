#!/usr/bin/env bash
# One-shot check on a GPU machine, run from the repository root:
#
#   OUT=/some/folder bash bench/device_check.sh
#
# 1. versions and the GPU (nvidia-smi -L);
# 2. the CUDA tests:           pytest tests -m gpu             -> $OUT/gpu_tests.log
# 3. the GPU benchmark:        bench/bench_gpu.py              -> $OUT/bench_gpu.md
# 4. the CPU unit suite under this machine's torch (proves the declared torch range), with pytest-xdist
#    (-n 8) when installed     pytest tests                    -> $OUT/unit_tests.log
#
# Nothing is installed or downloaded (lowbit runs from src/ via PYTHONPATH). A failing step never stops
# the next one; every step has a time limit so the whole script stays under about 4 minutes on a
# 16-core H100 machine. The summary at the end gives each step's exit status (124: hit its time limit).
set -u

OUT="${OUT:-./device_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

step_time() { echo $(( $(date +%s) - $1 )); }

echo "== versions =="
date -u
"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
    import torch.distributed as dist
    print("nccl available", dist.is_nccl_available())
for mod in ("numpy", "onnx", "onnxruntime", "safetensors", "hypothesis", "pytest", "xdist"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # report, do not stop
        print(mod, "MISSING:", type(e).__name__, e)
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>&1 | tee -a "$OUT/versions.txt"
else
    echo "nvidia-smi not found" | tee -a "$OUT/versions.txt"
fi

echo
echo "== 1/3 CUDA tests (pytest -m gpu) =="
T=$(date +%s)
timeout -k 10 150 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rfEs --durations=10 2>&1 | tee "$OUT/gpu_tests.log"
RC_GPU=${PIPESTATUS[0]}
S_GPU=$(step_time "$T")

echo
echo "== 2/3 GPU benchmark (bench/bench_gpu.py) =="
T=$(date +%s)
timeout -k 10 70 "$PY" bench/bench_gpu.py 2>&1 | tee "$OUT/bench_gpu.md"
RC_BENCH=${PIPESTATUS[0]}
S_BENCH=$(step_time "$T")

echo
echo "== 3/3 CPU unit suite under this torch =="
XDIST=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n 8)
fi
T=$(date +%s)
# CUDA_VISIBLE_DEVICES="" so the CPU suite runs as on a machine without a GPU (its gpu tests are deselected anyway)
CUDA_VISIBLE_DEVICES="" timeout -k 10 90 "$PY" -m pytest tests -q -p no:cacheprovider -rfE "${XDIST[@]}" 2>&1 \
    | tee "$OUT/unit_tests.log"
RC_UNIT=${PIPESTATUS[0]}
S_UNIT=$(step_time "$T")

echo
echo "== summary =="
{
    echo "device: $(nvidia-smi -L 2>/dev/null | head -1)"
    echo "torch:  $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)"
    echo "gpu tests:  exit $RC_GPU in ${S_GPU}s   -> $(grep -E '(passed|failed|skipped|error|no tests ran).* in [0-9.]+s' "$OUT/gpu_tests.log" | tail -1)"
    echo "bench:      exit $RC_BENCH in ${S_BENCH}s   -> $OUT/bench_gpu.md"
    echo "unit suite: exit $RC_UNIT in ${S_UNIT}s ${XDIST[*]:-(no xdist)}   -> $(grep -E '(passed|failed|skipped|error|no tests ran).* in [0-9.]+s' "$OUT/unit_tests.log" | tail -1)"
    echo "total:      $(step_time "$START")s  (exit 124 = hit the step's time limit)"
} | tee "$OUT/summary.txt"
