#!/usr/bin/env bash
# The prepared GPU check: on a machine with one CUDA GPU and no network, from the repository root,
#   bash benchmarks/gpu_check.sh            (logs and results in $OUT, else ./gpu-check)
# runs the CUDA-marked tests, bench.py --gpu (ResNet-50, 224 px, K=65536, batch 256, bf16 +
# channels_last, eager and torch.compile: MoCo, MoCo + FT, MoCo + FT + scores), the JPEG loader with
# every CPU core against the training step, and a two-epoch ftcl pretrain on a generated ImageFolder,
# then prints one summary table (benchmarks/gpu_check.py). Nothing is downloaded: it uses the Python
# found below, installing ftcl itself from this working tree when it is not importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, torchvision, yaml, jsonschema, pandas, scipy, PIL" 2>/dev/null; then
  echo "[gpu_check] $PY lacks torch/torchvision/pyyaml/jsonschema/pandas/scipy/pillow; install them first" >&2
  exit 2
fi
if ! "$PY" -c "import ftcl" 2>/dev/null; then
  echo "[gpu_check] installing ftcl from this working tree (no dependencies fetched)"
  "$PY" -m pip install --no-deps --no-build-isolation -q -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout 470 "$PY" benchmarks/gpu_check.py --out "${OUT:-gpu-check}" "$@"
