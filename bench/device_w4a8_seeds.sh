#!/usr/bin/env bash
# W4A8 AdaRound on EfficientNet-Lite0, several seeds (and folds) at once on one GPU, plus the CUDA tests, run
# from the repository root of a GPU machine:
#
#   OUT=/some/folder DATA=path/to/imagenet-samples SEEDS="2 3 4 5" bash bench/device_w4a8_seeds.sh
#   OUT=/some/folder DATA=... SEEDS="0 1" FOLDS="0 1" EXTRA="--ada-granularity block" bash bench/device_w4a8_seeds.sh
#
# Each run is one `bench/bench_dfq_adaround.py --rows float,w4a8` process with the configuration of the CPU
# runs in docs/benchmarks.md: uint4 weights with a zero point per channel, 1500 it/layer (or per block),
# batch 8, lr 3e-2, lambda 1, `--ada-seed` = the seed. Without FOLDS: 250 calibration images + 250 crops,
# 750 evaluation images ("Asymmetric int4 weights and more calibration images"). With FOLDS: the two-fold
# cross-validation of "500 distinct calibration images" (`--split halves --fold F`: 500 calibration
# images, evaluation on the other 500), one process per seed and fold. The processes share the GPU
# (AdaRound's small steps leave it mostly idle, so they overlap). `pytest -m gpu` runs beside them. Logs:
# $OUT/seed<N>.log or $OUT/seed<N>_fold<F>.log, $OUT/gpu_tests.log. EfficientNet-Lite0's two wheels travel
# in .whl/ (installed to /tmp/site) when the machine lacks them. Every run has a time limit (SEED_LIMIT
# seconds, default 460).
set -u
OUT="${OUT:-./device_out}"
DATA="${DATA:-../shared/data/imagenet-samples}"
SEEDS="${SEEDS:-2 3 4 5}"
FOLDS="${FOLDS:-}"            # e.g. "0 1": the halves split, one run per seed and fold
SEED_LIMIT="${SEED_LIMIT:-460}"
THREADS="${THREADS:-3}"       # CPU threads per run
EXTRA="${EXTRA:-}"            # more bench_dfq_adaround.py options, e.g. --no-tf32
GPU_TESTS="${GPU_TESTS:-1}"   # 0: skip pytest -m gpu
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import efficientnet_lite_pytorch" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
date -u
nvidia-smi -L 2>&1
"$PY" -c "import torch, onnx, onnxruntime; print('torch', torch.__version__, 'onnx', onnx.__version__, 'ort', onnxruntime.__version__, torch.cuda.get_device_name())"

START=$(date +%s)
COMMON=(--device cuda --data "$DATA" --rows float,w4a8 --ada-calib 500 --ada-iters 1500 --ada-batch 8
        --ada-lr 3e-2 --ada-reg 1 --w4-grids minmax --w4-fidelity --w4-asym --eval-batch 125 --threads "$THREADS"
        --progress)
LOGS=()
for s in $SEEDS; do
    if [ -z "$FOLDS" ]; then
        LOGS+=("$OUT/seed$s.log")
        timeout -k 10 "$SEED_LIMIT" "$PY" bench/bench_dfq_adaround.py "${COMMON[@]}" --images 750 --calib 250 \
            --ada-seed "$s" $EXTRA >"$OUT/seed$s.log" 2>&1 &
    else
        for f in $FOLDS; do
            LOGS+=("$OUT/seed${s}_fold$f.log")
            timeout -k 10 "$SEED_LIMIT" "$PY" bench/bench_dfq_adaround.py "${COMMON[@]}" --split halves --fold "$f" \
                --images 500 --calib 500 --ada-seed "$s" $EXTRA >"$OUT/seed${s}_fold$f.log" 2>&1 &
        done
    fi
done
if [ "$GPU_TESTS" = 1 ]; then
    timeout -k 10 300 "$PY" -m pytest tests -m gpu -q -rfEs >"$OUT/gpu_tests.log" 2>&1 &
fi
wait
echo "all done in $(( $(date +%s) - START )) s"
[ "$GPU_TESTS" = 1 ] && tail -n 3 "$OUT/gpu_tests.log"
for log in "${LOGS[@]}"; do
    echo "== $(basename "$log" .log)"
    grep -E "^\|" "$log" || tail -n 5 "$log"
done
