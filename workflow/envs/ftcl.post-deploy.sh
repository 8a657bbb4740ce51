#!/usr/bin/env bash
# Installs ftcl from this repository into the rules' conda environment. Snakemake runs this once,
# right after creating the environment, from the folder it was started in: the repository root.
set -euo pipefail
if ! grep -qs '^name = "ftcl"' pyproject.toml; then
    echo "ftcl.post-deploy.sh: run snakemake --sdm conda from the ftcl repository root" >&2
    exit 1
fi
pip install --no-deps -e .
