#!/usr/bin/env python
"""GPU memory estimate for a configured run: `outlier-hydra estimate-vram`, same overrides as a run.

scripts/estimate_vram.py model=qwen3_30b dataset.sequence_length=4096
"""

import sys

from outlier_hydra.cli import main

if __name__ == "__main__":
    sys.exit(main(["estimate-vram", *sys.argv[1:]]))
