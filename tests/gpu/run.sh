#!/usr/bin/env bash
# The GPU suite: bf16 training steps of tiny, grouped-GEMM numerics, EP=2 over NCCL (with 2 GPUs),
# inference on CUDA. Run from anywhere on a machine with a CUDA GPU and the project's venv:
#   tests/gpu/run.sh [extra pytest args]     # TIMEOUT=seconds to change the 900 s limit
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
export HF_HOME=$PWD/.cache/hf MPLCONFIGDIR=$PWD/.cache/matplotlib TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions
unset DS_ACCELERATOR  # DeepSpeed detects CUDA itself
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
exec timeout --signal=INT --kill-after=30 "${TIMEOUT:-900}" "$PY" -m pytest tests/gpu -ra -q -p no:cacheprovider "$@"
