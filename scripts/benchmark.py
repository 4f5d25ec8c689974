#!/usr/bin/env python
"""Collection cost vs the bare forward: `outlier-hydra benchmark`, same overrides.

scripts/benchmark.py benchmark=cpu_mid
scripts/benchmark.py benchmark=qwen3_shape analysis.collector.backend=dense
"""

import sys

from outlier_hydra.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
