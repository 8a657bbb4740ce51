#!/usr/bin/env bash
# Install ftcl into ./.venv (and, when run as root, the Debian packages it uses).
#   bash install.sh           # Python package + Fashion-MNIST
#   FTCL_TEST_DEPS=1 bash install.sh   # also what the test suite needs (chromium; tests/slurm/cluster.sh brings up SLURM)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  pkgs="dataset-fashion-mnist"
  [ "${FTCL_TEST_DEPS:-0}" = 1 ] && pkgs="$pkgs chromium"
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "[install] apt-get install $missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
elif [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[install] not root: install Debian's dataset-fashion-mnist yourself, or set data.root to a folder"
  echo "          holding the Fashion-MNIST idx files (train-images-idx3-ubyte.gz, ...)"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "[install] pip install -e .[test] into .venv (torch is large: a few minutes the first time)"
.venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
# deepforest ships real VOC-format annotations used by the detection tests; its own
# dependencies (a full training stack) are not needed for that.
.venv/bin/pip install -q --no-deps deepforest==2.1.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import ftcl, torch, torchvision, mlflow, snakemake, submitit, simplejpeg" \
  && echo "[install] done: .venv/bin/ftcl, .venv/bin/snakemake"
.venv/bin/python -c "from ftcl.data.jpeg import decoder; print('[install] JPEG decoder (data.decode: fast):', decoder())"
