#!/usr/bin/env bash
# The GPU check, as one prepared command for a machine with a GPU and only PyTorch (CUDA), PyArrow,
# pandas and NumPy: the loader's and train.py's rates, peak GPU memory and test AUC, in at most 8 minutes.
#
#   bash bench/gpu_check.sh [DATA] [PREPROCESSORS]     # default: data preprocessors, as `make demo` leaves them
#
# Carry DATA/processed and PREPROCESSORS along (a few MiB after `make demo`); results go to
# ${GPU_CHECK_OUT:-/tmp/gpu-check}/gpu_check.json. PYTHON picks the interpreter (default: .venv's if there
# is one, else python3). CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data}
preprocessors=${2:-preprocessors}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
"$PYTHON" - <<'PY'
import sys
try:
    import torch
except ImportError:
    sys.exit(f"bench/gpu_check.sh: {sys.executable} has no PyTorch; set PYTHON to an interpreter that has")
if not torch.cuda.is_available():
    sys.exit("bench/gpu_check.sh: PyTorch sees no GPU on this machine; run it on one that has a GPU")
PY
exec timeout 480 "$PYTHON" bench/gpu_check.py --data "$data" --preprocessors "$preprocessors" \
    --out "${GPU_CHECK_OUT:-/tmp/gpu-check}"
