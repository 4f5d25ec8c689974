#!/usr/bin/env python
"""GPU memory estimate for a configured run: same overrides as the main command.

    scripts/estimate_vram.py model=qwen3_30b dataset.sequence_length=4096
"""
import sys

from outlier_hydra.estimate_vram import main

if __name__ == "__main__":
    sys.exit(main())
