"""Where results are logged besides the run directory: `logger=none` (default) or `logger=wandb`.

Every logger gets the same records that final_analysis_results.json holds, the merged statistics,
the plots and the timing. open_logger is a context manager: the logger's run is finished even when
the job fails (W&B marks it failed).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any


class NullLogger:
    def log_results(self, results, total, plots, timing, stages=(), report=None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


@contextmanager
def open_logger(cfg, out: Path, plain_config: dict):
    backend = cfg.logger.backend
    logger: Any
    if backend == "none":
        logger = NullLogger()
    elif backend == "wandb":
        from outlier_hydra.output.loggers.wandb_logger import WandbLogger

        logger = WandbLogger(cfg.logger, out, plain_config)
    else:
        from outlier_hydra.errors import OutlierHydraError

        raise OutlierHydraError(f"logger.backend: {backend!r} is not one of none, wandb")
    try:
        yield logger
    except BaseException:
        logger.finish(exit_code=1)
        raise
    logger.finish(exit_code=0)
