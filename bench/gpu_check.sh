#!/usr/bin/env bash
# The GPU check, as one prepared command for a machine with a GPU and only PyTorch (CUDA), PyArrow,
# pandas and NumPy: the loader's and train.py's rates, peak GPU memory and test AUC, in at most 8 minutes.
#
#   bash bench/gpu_check.sh [DATA] [PREPROCESSORS]     # default: data preprocessors, as `make demo` leaves them
#
# Carry DATA/processed and PREPROCESSORS along (a few MiB after `make demo`); results go to
# ${GPU_CHECK_OUT:-/tmp/gpu-check}/gpu_check.json. CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data}
preprocessors=${2:-preprocessors}
python=${PYTHON:-$(command -v python3 || command -v python)}
"$python" -c 'import torch; assert torch.cuda.is_available(), "PyTorch sees no GPU here"'
exec timeout 480 "$python" bench/gpu_check.py --data "$data" --preprocessors "$preprocessors" \
    --out "${GPU_CHECK_OUT:-/tmp/gpu-check}"
