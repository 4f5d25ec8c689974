#!/usr/bin/env python
"""Collection cost vs the bare forward (see outlier_hydra/benchmark.py). Same overrides as the app:

    scripts/benchmark.py benchmark=cpu_mid
    scripts/benchmark.py benchmark=qwen3_shape analysis.collector.backend=dense
"""
from outlier_hydra.benchmark import main

if __name__ == "__main__":
    main()
