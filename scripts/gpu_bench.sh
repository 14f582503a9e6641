#!/usr/bin/env bash
# The paper's Table 2 TTFT setting on one GPU: 5 fully connected CopyMachine agents, prefix 512, input 1024,
# output 512 (teacher-forced), every serving mode, Llama-3.1-8B architecture with random weights in bf16.
# Meant to finish in < 8 minutes on one H100 (model init ~1 min, warm-up + 20 samples ~2-4 min); a hard
# timeout stops it at KVCOMM_BENCH_TIME_LIMIT seconds (default 460).
#
# Needs: a python with a CUDA torch, transformers, tqdm and matplotlib; nothing else (no Ray, no venv, no registry:
# the repository goes on PYTHONPATH). The random-weight model uses the embedded SmolLM2 tokenizer when it is
# installed (its 49K ids fit Llama's 128K vocabulary), else kvcomm.word_tokenizer.WordTokenizer.
# For a one-shot check of a new GPU machine (parity, TTFT, decode, memory) run scripts/gpu_check.sh instead.
# Writes: $OUT.json (the report), $OUT.png (the figure), $OUT.md (the markdown table), $OUT.log (stderr).
#
# Every setting can be overridden from the environment, which is how the CPU test runs this very script
# with a tiny model (tests/unit/test_ttft_bench.py):
#   KVCOMM_BENCH_DEVICE (cuda)  KVCOMM_BENCH_DTYPE (bfloat16)  KVCOMM_BENCH_MODEL (llama-3.1-8b, random weights)
#   KVCOMM_BENCH_AGENTS (5)  KVCOMM_BENCH_PREFIX (512)  KVCOMM_BENCH_INPUT (1024)  KVCOMM_BENCH_OUTPUT (512)
#   KVCOMM_BENCH_SAMPLES (20)  KVCOMM_BENCH_WARMUP (2)  KVCOMM_BENCH_MODES (all six)
#   KVCOMM_BENCH_OUT (results/ttft_gpu)  KVCOMM_BENCH_TIME_LIMIT (460)  PYTHON (.venv/bin/python)
#   KVCOMM_BENCH_CALIBRATION (none: kvcomm without a recompute budget; a calibration file runs its knobs, e.g.
#     configs/calibration/smollm2-135m-instruct.json for the shipped recipe's cost on this GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

PY=${PYTHON:-.venv/bin/python}
if ! [ -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  PY=python3
fi
DEVICE=${KVCOMM_BENCH_DEVICE:-cuda}
DTYPE=${KVCOMM_BENCH_DTYPE:-bfloat16}
MODEL=${KVCOMM_BENCH_MODEL:-llama-3.1-8b}
AGENTS=${KVCOMM_BENCH_AGENTS:-5}
PREFIX=${KVCOMM_BENCH_PREFIX:-512}
INPUT=${KVCOMM_BENCH_INPUT:-1024}
OUTPUT=${KVCOMM_BENCH_OUTPUT:-512}
SAMPLES=${KVCOMM_BENCH_SAMPLES:-20}
WARMUP=${KVCOMM_BENCH_WARMUP:-2}
MODES=${KVCOMM_BENCH_MODES:-dense,dense-prefix,naive,cacheblend,kvcomm,hybrid}
OUT=${KVCOMM_BENCH_OUT:-results/ttft_gpu}
TIME_LIMIT=${KVCOMM_BENCH_TIME_LIMIT:-460}
CALIBRATION=${KVCOMM_BENCH_CALIBRATION:-none}

mkdir -p "$(dirname "$OUT")"
if [[ "$DEVICE" == cuda* ]]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: $PY's torch sees no CUDA device (KVCOMM_BENCH_DEVICE=$DEVICE); set PYTHON to a CUDA build" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi

echo "gpu_bench: $MODEL (random weights) on $DEVICE/$DTYPE: $AGENTS agents, prefix $PREFIX, input $INPUT," \
     "output $OUTPUT, $SAMPLES samples after $WARMUP warm-up; limit ${TIME_LIMIT}s" >&2
started=$(date +%s)
status=0
timeout "$TIME_LIMIT" "$PY" -m kvcomm.bench.ttft \
  --device "$DEVICE" --dtype "$DTYPE" --model "$MODEL" --random-weights \
  --agents "$AGENTS" --prefix "$PREFIX" --input "$INPUT" --output "$OUTPUT" --modes "$MODES" \
  --samples "$SAMPLES" --warmup "$WARMUP" --threads 2 --calibration "$CALIBRATION" \
  --json "$OUT.json" --plot "$OUT.png" > "$OUT.md" 2> >(tee "$OUT.log" >&2) || status=$?
cat "$OUT.md"
echo "gpu_bench: exit $status after $(( $(date +%s) - started ))s; wrote $OUT.json $OUT.png $OUT.md $OUT.log" >&2
if [ "$status" -eq 124 ]; then
  echo "gpu_bench: stopped by the ${TIME_LIMIT}s limit; rerun with a smaller KVCOMM_BENCH_SAMPLES" >&2
fi
exit "$status"
