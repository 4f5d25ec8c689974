"""`python -m outlier_hydra [overrides]`: the Hydra entry point (the work is in run.py)."""

import hydra
from omegaconf import DictConfig

from outlier_hydra import schema  # noqa: F401  (registers the typed config schema)
from outlier_hydra.paths import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> int:
    from outlier_hydra.cli import run_or_exit

    return run_or_exit(cfg)


if __name__ == "__main__":
    main()
