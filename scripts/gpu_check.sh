#!/usr/bin/env bash
# The GPU check in one command (about 6 minutes on one H100/H200, from a fresh copy of the repo):
#   scripts/gpu_check.sh              the CUDA tests, the reductions alone (reduce_bench.py --tune),
#                                     then benchmark=olmoe_shape, qwen3_shape,
#                                     gpt_oss_20b_shape and mixtral_shape (16 of Mixtral's 32 layers),
#                                     then stage_breakdown.py on the first preset ($BREAKDOWN: which
#                                     presets; empty: none)
#   TUNE=0 scripts/gpu_check.sh       without reduce_bench.py --tune: the default launch shape
#   DEVICE=cpu scripts/gpu_check.sh   the same steps on the CPU presets (cpu_tiny, cpu_mid): the
#                                     script checked end to end on a machine without a GPU
# Writes benchmarks/results/<card>-<date>.json (every preset's benchmark.json) and the breakdowns'
# <card>-<date>-breakdown_<preset>.log ($RESULTS: another folder), and prints one table:
# forward, collection, collection with the whole forward, chunked, copy-to-host (x forward),
# tokens/s and peak memory. Commit that file with the card's name in it.
#
# Python: $PYTHON if set; else one whose torch sees a GPU (a GPU image's python3, or .venv); else
# `make install` (pip takes PyPI's CUDA build of torch on a GPU box). On a box without network,
# WHEELS=dir installs the missing pure-Python dependencies from wheels (scripts/gpu_wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  PRESETS=${PRESETS:-"cpu_tiny cpu_mid"}
else
  PRESETS=${PRESETS:-"olmoe_shape qwen3_shape gpt_oss_20b_shape mixtral_shape"}
fi

has_torch() {  # $1: python; $2: cuda|cpu
  "$1" -c "import sys, torch; sys.exit(0 if ('$2' == 'cpu' or torch.cuda.is_available()) else 1)" 2>/dev/null
}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null && has_torch "$candidate" "$DEVICE"; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ]; then make install; PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import hydra, omegaconf, transformers, rich" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/outlier_hydra_site "$WHEELS"/*.whl
    # .whl/site: MiniLM's tokenizer package for the tests' tiny models (gpu_wheels.sh)
    export PYTHONPATH="$PYTHONPATH:/tmp/outlier_hydra_site:$(cd "$WHEELS" && pwd)/site"
  else
    "$PY" -m pip install -q -e '.[test]'
  fi
fi
"$PY" -c "import torch; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

WORK=$(mktemp -d)
echo "== CUDA tests (they skip without a GPU), and the experts kernels against numpy (on the GPU there)"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_benchmark.py tests/test_experts.py || echo "gpu_check: CUDA tests FAILED"
"$PY" -m pytest -q -p no:cacheprovider tests/test_experts.py -k expert_rows_against_numpy || echo "gpu_check: kernel tests FAILED"

if [ "$DEVICE" = cuda ] && [ "${TUNE:-1}" = 1 ]; then
  echo "== the reductions alone, one [8192, 2048] bf16 tensor (Triton launch shapes tuned)"
  OUT_BLOCKS="$WORK/blocks" "$PY" scripts/reduce_bench.py --tune || echo "gpu_check: reduce_bench FAILED"
  # the presets run with the fastest launch shape found (each benchmark.json records the one it used)
  if [ -z "${OUTLIER_HYDRA_TRITON_BLOCKS:-}" ] && [ -s "$WORK/blocks" ]; then
    export OUTLIER_HYDRA_TRITON_BLOCKS=$(cat "$WORK/blocks")
  fi
fi

failed=""
for preset in $PRESETS; do
  echo "== benchmark=$preset"
  if ! "$PY" -m outlier_hydra benchmark "benchmark=$preset" "hydra.run.dir=$WORK/$preset" progress=false; then
    failed="$failed $preset"
  fi
done

"$PY" -m outlier_hydra.tools.benchmark_results "$WORK" "${RESULTS:-benchmarks/results}" "$DEVICE"

# where the time goes, stage by stage and by the project's functions (device time on a GPU)
CARD=$("$PY" -c "import torch; from outlier_hydra.tools.benchmark_results import card_slug as s; print(s(torch.cuda.get_device_name(0)) if '$DEVICE' == 'cuda' else 'cpu')")
for preset in ${BREAKDOWN-${PRESETS%% *}}; do
  echo "== stage breakdown, benchmark=$preset"
  log="${RESULTS:-benchmarks/results}/$CARD-$(date +%F)-breakdown_$preset.log"
  "$PY" scripts/stage_breakdown.py "benchmark=$preset" > "$log" 2>&1 || failed="$failed breakdown_$preset"
  grep -A12 "^experts: \|whole forward:" "$log" || true
done
if [ -n "$failed" ]; then echo "gpu_check: presets that failed:$failed"; exit 1; fi
