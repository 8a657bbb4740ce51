#!/usr/bin/env bash
# The prepared GPU check, for a node with one CUDA GPU, no network, and only its image's Python:
#
#   bash benchmarks/fetch_wheels.sh          # here, with network: the wheels the image lacks -> .whl/ (~1 MiB)
#   bash benchmarks/gpu_check.sh             # there, in a copy of this working tree carrying .whl/
#   bash benchmarks/gpu_check.sh --rehearse  # on a CPU: every part at tiny sizes, the CUDA-only ones skipped
#
# Logs, results and summary.md go to $OUT (else ./gpu-check); the parts, their time budgets and the
# goals are in benchmarks/gpu_check.py. The whole check stops after 475 s (a rehearsal: 1260 s).
#
# Python: $PYTHON, else python3 (the node image's /opt/torch/.venv/bin/python3: Python 3.12, torch 2.11).
# What each part needs:
#   from the image   torch, torchvision, numpy, pyyaml (every part); pandas, scipy (ftcl.results.stats:
#                    the methods parts; pandas also tests/helpers.py); pillow (data, loader, pretrain);
#                    pyarrow (ftcl.data.jpeg: loader, pretrain); matplotlib (pretrain's score plots);
#                    pytest (cuda-tests; pytest-timeout for its timeout); triton (methods-compile)
#   from .whl/       jsonschema + jsonschema-specifications + referencing + rpds-py: config validation,
#                    every part that resolves a config (all but data); simplejpeg: data.decode: fast,
#                    what the loader and pretrain parts measure (without it they run on PIL, and the
#                    environment row says so)
#   never            mlflow (pretrain runs with tracking.enabled=false), submitit, snakemake (no
#                    launcher, no pipeline: ftcl pretrain directly), pycocotools (no detection); the
#                    environment part fails if the check's modules import any of them
# The wheels are installed offline into a temporary folder put first on PYTHONPATH, with this working
# tree (ftcl itself is not installed), so nothing in the image changes.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
WHEELS=${FTCL_WHEELS:-$REPO/.whl}
LIMIT=475
for arg in "$@"; do
  if [ "$arg" = "--rehearse" ]; then LIMIT=1260; fi
done

SITE=$(mktemp -d "${TMPDIR:-/tmp}/ftcl-gpu-check-site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  echo "[gpu_check] installing ${#wheels[@]} wheels from $WHEELS into $SITE (offline)"
  # PIP_CONFIG_FILE=/dev/null: no index or find-links from any pip config; only the files named here
  PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
else
  echo "[gpu_check] no wheels in $WHEELS (bash benchmarks/fetch_wheels.sh fetches them where there is network)"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "torchvision", "numpy", "yaml", "pandas", "scipy", "PIL", "pyarrow", "jsonschema", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "[gpu_check] $PY cannot import: $missing (jsonschema: run bash benchmarks/fetch_wheels.sh and carry .whl/)" >&2
  exit 2
fi
if ! "$PY" -c "import simplejpeg" 2>/dev/null; then
  echo "[gpu_check] simplejpeg is missing: the loader and pretrain parts will decode with PIL, not data.decode: fast" >&2
fi
# --foreground: gpu_check.py stays in this shell's process group, so Ctrl-C or a kill of the group
# reaches it; on SIGTERM (also from the timeout) it kills the running part's process group and
# writes the summary of what finished
status=0
timeout --foreground -k 10 "$LIMIT" "$PY" benchmarks/gpu_check.py --out "${OUT:-gpu-check}" "$@" || status=$?
exit "$status"
