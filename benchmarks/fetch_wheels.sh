#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels the GPU check (benchmarks/gpu_check.sh) needs beyond
# the GPU node's image, into a git-ignored folder that travels with the working tree:
#
#   bash benchmarks/fetch_wheels.sh                       # cp312 manylinux x86_64 wheels into .whl/
#   bash benchmarks/fetch_wheels.sh --python-version 3.11 --dest DIR   # another Python's builds
#   bash benchmarks/fetch_wheels.sh --pins                # print the pinned NAME==VERSION lines
#
# The image (Python 3.12, torch, torchvision, numpy, pandas, scipy, pyyaml, pillow, matplotlib,
# seaborn, scikit-learn, pyarrow, tabulate, psutil, attrs, typing-extensions, pytest, ...) lacks:
#
#   jsonschema                  ftcl.config.schema validates every run config: every part of the check
#   jsonschema-specifications   jsonschema's metaschemas (a dependency of jsonschema)
#   referencing                 jsonschema's $ref resolution (a dependency of jsonschema)
#   rpds-py                     referencing's persistent maps, a C extension (cp312 build)
#   simplejpeg                  data.decode: fast (TurboJPEG), what the loader and pretrain parts measure;
#                               without it ftcl decodes with PIL and the loader figure is not decode: fast
#
# Their other dependencies (attrs, typing-extensions, numpy) are in the image. Not fetched, because
# the check does not use them: mlflow (it runs ftcl pretrain with tracking.enabled=false), submitit
# and snakemake (no pipeline, no launcher), pycocotools (no detection).
#
# The versions are those of the development venv (.venv); pure-Python wheels are py3. Each run
# replaces the folder's wheels, so it holds exactly one version of each. Everything is resolved
# with --no-deps: each package the image lacks is named above, nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=(
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
  simplejpeg==1.9.0
)

PYVER=3.12
DEST=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    --pins) printf '%s\n' "${PINS[@]}"; exit 0 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "fetch_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

mkdir -p "$DEST"
TMP=$(mktemp -d "$DEST/.fetch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$TMP" "${PINS[@]}"
count=$(find "$TMP" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$count" -ne "${#PINS[@]}" ]; then
  echo "fetch_wheels.sh: expected ${#PINS[@]} wheels, got $count" >&2
  exit 1
fi
rm -f "$DEST"/*.whl
mv "$TMP"/*.whl "$DEST"/
echo "[fetch_wheels] $(du -sh "$DEST" | cut -f1) in $DEST (Python $PYVER):"
(cd "$DEST" && ls -1 ./*.whl | sed 's|^\./|  |')
