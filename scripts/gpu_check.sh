#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA machine: scripts/gpu_check.sh OUTDIR        (one H100: under 8 minutes)
#                                      or on the CPU: scripts/gpu_check.sh --tiny OUTDIR (the same code paths, tiny model)
#
# Needs only a python3 with a CUDA torch and transformers (numpy, tqdm; matplotlib for the figure): no Ray, no
# pydantic, no flash-attn, no project venv, no registry, no model files (random weights). The repository goes on
# PYTHONPATH. Runs kvcomm.gpu_check: bf16 parity with transformers on a Llama-3.1-8B-shaped random-weight model
# (logits; 32 greedy tokens), the Table-2 TTFT setting in every mode, decode tokens/s at batch 1, 16 and 64,
# peak memory against the memory plan, and the shipped recompute recipe's cost against naive reuse (issue #16). Writes OUTDIR/gpu_check.json, OUTDIR/summary.md, OUTDIR/ttft.png and
# OUTDIR/gpu_check.log; exits 0 when every check passed.
#
#   PYTHON (default: the repository's .venv/bin/python when present, else python3)
#   KVCOMM_CHECK_TIME_LIMIT (default 470 s; 170 s with --tiny): the hard stop; results so far stay in OUTDIR
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TINY=()
if [ "${1:-}" = "--tiny" ]; then TINY=(--tiny); shift; fi
if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu_check.sh [--tiny] OUTDIR" >&2
  exit 2
fi
OUTDIR="$1"
mkdir -p "$OUTDIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
if [ ${#TINY[@]} -eq 0 ]; then
  LIMIT="${KVCOMM_CHECK_TIME_LIMIT:-470}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
else
  LIMIT="${KVCOMM_CHECK_TIME_LIMIT:-170}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
status=0
timeout "$LIMIT" "$PY" -m kvcomm.gpu_check "${TINY[@]}" "$OUTDIR" 2> >(tee "$OUTDIR/gpu_check.log" >&2) || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check: stopped by the ${LIMIT}s limit; what was measured is in $OUTDIR" >&2
fi
exit "$status"
