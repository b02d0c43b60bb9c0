#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool), under 7 minutes in all: install offline,
# the GPU tests, the decode benchmarks (issue 18 points 1-2: 350M b1/b8 and the 512-token
# prefill beside transformers), the training benchmark (issue 18 point 3), then 16B b1 if the
# time is left. Every step runs under its own timeout and one failure does not stop the rest;
# everything is written under $OUT, and the last line printed is a compact JSON summary
# (bench/gpu_summary.py). TOTAL_S (default 400) is the wall-clock budget of the whole script.
#
# Check the Python parts on CPU (tiny shapes, seconds):  GPU_SH_CPU_CHECK=1 bash bench/gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
# the second compilation of one program (decode.py's kernel count) is read from this cache
export JAX_COMPILATION_CACHE_DIR=/tmp/gpu-jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
START=$(date +%s)
TOTAL_S=${TOTAL_S:-400}
CPU_CHECK=${GPU_SH_CPU_CHECK:-}

left() { echo $((START + TOTAL_S - $(date +%s))); }

# step NAME SECONDS COMMAND...: run under `timeout` (at most what is left of TOTAL_S), output in
# $OUT/NAME.log, and one line {"step", "rc", "s"} in $OUT/steps.jsonl (rc 124: timed out).
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    if [ "$(left)" -lt "$limit" ]; then limit=$(left); fi
    if [ "$limit" -lt 20 ]; then
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"no time left\"}" >>"$OUT/steps.jsonl"
        return
    fi
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"s\": $(($(date +%s) - t0))}" >>"$OUT/steps.jsonl"
    echo "== $name: rc $rc in $(($(date +%s) - t0)) s"
    tail -n 4 "$OUT/$name.log"
}

if [ -z "$CPU_CHECK" ]; then
    step install 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
    SIZES=350M BIG=16B PEERS=350M PROMPT=512 NEW=128 CHUNKS=16,64 ATTENTION=sum,dot REPEATS=3
    TESTS="tests/test_gpu.py tests/model/test_modeling.py tests/decoders/test_local.py"
else  # the same steps on CPU with tiny shapes: does every Python part run?
    SIZES=tiny BIG=tiny PEERS=none PROMPT=32 NEW=8 CHUNKS=4,8 ATTENTION=dot,sum REPEATS=1
    TESTS="tests/test_gpu.py"
fi
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax',
flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__,
jax.devices())" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# ---- GPU tests: fp32 parity with transformers on the device, bf16/int8 agreement, decoding
# shellcheck disable=SC2086
step tests 80 python3 -m pytest -q -p no:cacheprovider -rfE --junitxml="$OUT/tests.xml" $TESTS

# ---- decode (issue 18.1/18.2): 350M b1 greedy (chunk sizes; the decode attention as fused
# sums, the GPU default, and as matmuls), b8 sampled, 512-token prefill, the kernels one decode
# step launches, a profiler trace, transformers bf16 beside each
step decode 150 python3 bench/decode.py gpu --sizes "$SIZES" --peer-sizes "$PEERS" \
    --prompt "$PROMPT" --new "$NEW" --repeats "$REPEATS" --chunks "$CHUNKS" \
    --attention "$ATTENTION" \
    --trace /tmp/gpu-trace --trace-size "$SIZES"
grep -h '^{' "$OUT/decode.log" >"$OUT/decode.jsonl"
# the profiler trace comes back only when small (a large one could keep $OUT from coming back)
if [ -d /tmp/gpu-trace ] && [ "$(du -sm /tmp/gpu-trace | cut -f1)" -le 20 ]; then
    cp -r /tmp/gpu-trace "$OUT/trace"
fi

# ---- training (H4, issue 18.3: bench/train.py) -------------------------------------------
# Training on fused attention (issue 18 point 3): cuDNN flash attention against XLA on the GPU,
# then bench/train.py (350M, then 2B with remat, each beside transformers' step); 170 s in all:
# the benchmark starts no measurement past its budget and writes a line for each it skipped.
if [ -z "$CPU_CHECK" ]; then
timeout 170 bash -c 'out=$1
    timeout 30 python3 -m pytest -q -p no:cacheprovider -k "cudnn or highest" \
        tests/model/test_attention.py \
        2>&1 | tail -3 | tee "$out/train_gpu_tests.log" >&2
    python3 bench/train.py --budget-s 135 2>"$out/bench_train.err"' _ "$OUT" \
    | tee "$OUT/bench_train.jsonl"
tail -5 "$OUT/bench_train.err"
fi
# ---- end of training ------------------------------------------------------------------------

# ---- 16B b1 greedy (goal >= 110 tok/s), only in the time left: one repeat, no peer
if [ "$(left)" -ge 80 ]; then
    step decode16B 150 python3 bench/decode.py gpu --sizes "$BIG" --peer-sizes none \
        --prompt "$PROMPT" --new "$NEW" --repeats 1 --chunks 16 --quick
    grep -h '^{' "$OUT/decode16B.log" >"$OUT/decode16B.jsonl"
else
    echo "{\"step\": \"decode16B\", \"rc\": null, \"skipped\": \"$(left) s left\"}" >>"$OUT/steps.jsonl"
fi

python3 bench/gpu_summary.py "$OUT" "$(($(date +%s) - START))"
