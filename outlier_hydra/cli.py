"""Turn bad input into one line on stderr and a non-zero exit (a traceback only with debug=true)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from outlier_hydra.errors import OutlierHydraError

EXIT_BAD_INPUT = 2


def run_or_exit(cfg: DictConfig) -> int:
    """Run the job; returns the number of systematic features (a sweeper can optimise on it)."""
    from outlier_hydra.run import run

    try:
        return run(cfg)["num_systematic_outliers"]
    except OutlierHydraError as exc:
        if cfg.get("debug"):
            raise
        print(f"outlier_hydra: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def exit_code_of(prog: str, command) -> int:
    """For the small commands (merge, reanalyze, estimate_vram): run command(); bad input becomes
    one line on stderr and exit code 2."""
    try:
        command()
    except OutlierHydraError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
