"""Installed as `hydra_plugins.outlier_hydra_launcher` (see pyproject.toml): Hydra takes launchers
only from the hydra_plugins namespace. The code lives in outlier_hydra/launcher.py; this subclass
gives it its Hydra name. outlier_hydra.schema registers it with Hydra's Plugins.register, so editable
installs (which Hydra's scan of hydra_plugins does not see) find it too."""

from outlier_hydra.launcher import RequeueAwareSlurmLauncher as _Launcher


class RequeueAwareSlurmLauncher(_Launcher):
    """hydra.launcher._target_: hydra_plugins.outlier_hydra_launcher.RequeueAwareSlurmLauncher"""
