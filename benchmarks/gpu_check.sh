#!/usr/bin/env bash
# The GPU check in one command, from a fresh copy of the repository, with no network:
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR            # GPU machine: tests + medium + wide, ~5 min
#   bash benchmarks/gpu_check.sh --quick RESULTS_DIR    # any machine: tiny pair, CUDA if present
#
# Nothing is installed: shardmerge runs from this checkout (PYTHONPATH), with the interpreter's
# own torch, safetensors, huggingface_hub, pyyaml, tqdm and xxhash (PYTHON picks another
# interpreter). Data is generated under benchmarks/.data/gpu-check (--data-dir to move it).
# Everything else is benchmarks/gpu_check.py; see benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
missing=$("$PYTHON" - <<'PY'
import importlib.util
names = ["torch", "safetensors", "huggingface_hub", "yaml", "tqdm", "xxhash", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PY
)
if [[ -n "$missing" ]]; then
    echo "gpu_check: $PYTHON lacks: $missing (install them, or set PYTHON)" >&2
    exit 2
fi
exec "$PYTHON" benchmarks/gpu_check.py --python "$PYTHON" "$@"
