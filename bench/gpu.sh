#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool): install offline, run the GPU tests and
# the GPU decode benchmarks. Everything it prints is also saved under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, transformers; print('jax', jax.__version__, 'flax', flax.__version__,
'transformers', transformers.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -x -s -p no:cacheprovider \
    tests/test_gpu.py tests/model/test_modeling.py tests/decoders/test_local.py 2>&1 \
    | grep -vE "Writing model shards|Warning|warn" | tee "$OUT/gpu_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-300}" python3 bench/decode.py gpu --repeats 3 ${BENCH_ARGS:-} 2>"$OUT/bench_gpu.err" \
    | tee "$OUT/bench_gpu.jsonl"
tail -5 "$OUT/bench_gpu.err"
timeout 90 python3 bench/decode.py multiturn 2>>"$OUT/bench_gpu.err" | tee -a "$OUT/bench_gpu.jsonl"
