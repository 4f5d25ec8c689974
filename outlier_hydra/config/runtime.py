"""What Hydra's runtime says about the current job (nothing, outside a Hydra app)."""

from __future__ import annotations

from pathlib import Path


def hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("run(cfg) outside a Hydra app needs output_dir")
    return Path(HydraConfig.get().runtime.output_dir)


def multirun_sweep_dir() -> Path | None:
    """The sweep directory when this job is part of a `-m` run, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return Path(HydraConfig.get().sweep.dir)
    except Exception:  # noqa: BLE001 - no Hydra runtime: not a multirun
        pass
    return None
