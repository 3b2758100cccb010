#!/usr/bin/env bash
# The TensorRT path on an NVIDIA GPU, in one run (issue 5): installs what is missing,
# builds FP16 engines with dynamic batch profiles for every shipped image and audio
# model, checks them against ONNX Runtime on the CPU, times them against torch eager at
# batch 1 to 256, and runs `synthwatch scan` with the TensorRT backend. Bounded to
# 8 minutes; writes gpu_check.json into OUT_DIR (default benchmarks/results).
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# Where no package index is reachable, put wheels in .whl/ (python 3.12 here: see
# docs/PERFORMANCE.md): they are installed from there first. Third-party weights
# (AASIST, MesoNet) are measured when SYNTHWATCH_MODEL_DIR points at them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
BUDGET=470          # seconds for everything, under the issue's 8 minutes
start=$SECONDS
SITE="$(mktemp -d)"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PIP=("$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10 --target "$SITE")

"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
  { echo "gpu_check: no CUDA device visible to $PY" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if ! "$PY" -c "import synthwatch.models.registry" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "${PIP[@]}" --no-index --no-deps .whl/*.whl
  else
    "${PIP[@]}" av msgspec pydantic-settings structlog
  fi
fi
"$PY" -c "import synthwatch.models.registry" ||
  { echo "gpu_check: synthwatch does not import; install its dependencies" >&2; exit 1; }

if ! "$PY" -c "import tensorrt" 2>/dev/null; then
  cuda_major="$("$PY" -c 'import torch; print(torch.version.cuda.split(".")[0])')"
  timeout 180 "${PIP[@]}" "tensorrt-cu${cuda_major}" ||
    echo "gpu_check: TensorRT could not be installed; its figures will be recorded as unmeasured" >&2
fi

left=$((BUDGET - (SECONDS - start)))
timeout --kill-after=10 "$left" "$PY" -m benchmarks.gpu_check --out "$OUT"
rc=$?
echo "gpu_check: finished in $((SECONDS - start)) s (rc $rc)"
exit "$rc"
