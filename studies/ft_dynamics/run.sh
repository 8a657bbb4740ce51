#!/usr/bin/env bash
# Every run of the FT-dynamics study (docs/FT_DYNAMICS.md), one after the other, one thread each
# (about 3 minutes per ftcl run and 8 per independent run on a 2-core machine); a run whose result
# file exists is skipped. From the repository root: bash studies/ft_dynamics/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
runs=studies/ft_dynamics/runs
for spec in base:0 base:1 base:2 base:3 base:4 s1:0 s1:1 s1:2 s1:3 s1:4 detach_kmix:0 detach_kmix:1 detach_kmix:2 \
            detach_kmix:3 detach_kmix:4 noft:0 noft:1 s2:0 s4:0 head_linear:0 randperm:0 q_plain:0 k_plain:0 \
            ema_first:0 no_wd_bn_bias:0 default_init:0; do
  name=${spec%:*}; seed=${spec#*:}
  [ -f "$runs/${name}_seed${seed}.json" ] || "$PY" studies/ft_dynamics/ablate.py "$name" "$seed"
done
for seed in 0 1 2; do
  [ -f "$runs/independent_seed$seed.json" ] || \
    "$PY" studies/ft_dynamics/independent.py --ft --splits 8 --seed "$seed" --out "$runs/independent_seed$seed.json"
done
"$PY" studies/ft_dynamics/analyse.py
