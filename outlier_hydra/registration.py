"""register(): make the project known to Hydra, once per process, explicitly (nothing registers on import).

Entry points call it (the CLI, the Hydra task function a submitit job starts in, the tests). It stores
the schema and each stage's schema in the ConfigStore, the resolvers the shipped configs use
(``oh.corpus``, ``oh.minilm``) and the project's launcher plugins. It sits above the rooms it names
(config, stages, launch), so that none of them has to import it.
"""

from __future__ import annotations


def register() -> None:
    """Register schemas, stage schemas, resolvers and the launchers (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from outlier_hydra.config.paths import corpus_path, minilm_path
    from outlier_hydra.config.schema import Config
    from outlier_hydra.stages.registry import builtin_stages

    cs = ConfigStore.instance()
    # One schema for the whole tree: each group's YAML merges into its typed field of Config.
    cs.store(name="config_schema", node=Config)
    # Each stage's YAML (conf/analysis/stages/<name>.yaml) starts from its typed schema.
    for name, stage in builtin_stages().items():
        cs.store(group="analysis/stages", name=f"{name}_schema", node={name: stage.Config})
    if not OmegaConf.has_resolver("oh.corpus"):
        OmegaConf.register_new_resolver("oh.corpus", corpus_path)
    if not OmegaConf.has_resolver("oh.minilm"):
        OmegaConf.register_new_resolver("oh.minilm", minilm_path)
    _register_launchers()


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
