#!/usr/bin/env bash
# The one GPU check (issue #12): on a CUDA machine, peftcli's GPU paths tested and timed in
# one unattended call of under 10 minutes: the low-precision and packing tests with CUDA
# visible, then benchmarks/gpu_check.py (tokens/s and peak GPU memory of every training path
# beside PEFT's LoRA). Results land in $OUT (or the first argument).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs torch with CUDA, transformers, peft, safetensors, click, rich, numpy and pyyaml (the
# device image has them); peftcli runs from this checkout (PYTHONPATH), nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; date -u; } | tee "$out/machine.txt"
timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/test_train_lowprec.py tests/test_train_int8.py tests/test_quantize_on_load.py tests/test_train_packing.py 2>&1 | tail -15 | tee "$out/tests.txt"
timeout 330 python3 benchmarks/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log"
