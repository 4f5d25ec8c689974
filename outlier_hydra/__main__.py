"""`python -m outlier_hydra [subcommand] [overrides]`: the same as the `outlier-hydra` command (cli.py)."""

import sys

from outlier_hydra.cli import main

if __name__ == "__main__":
    sys.exit(main())
