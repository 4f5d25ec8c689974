"""Installed as `hydra_plugins.outlier_hydra_launcher` (see pyproject.toml): Hydra takes launchers
only from the hydra_plugins namespace. The code lives in outlier_hydra/launch/launcher.py; these
subclasses give it its Hydra names. outlier_hydra.registration.register() registers them with Hydra's
Plugins.register, so editable installs (which Hydra's scan of hydra_plugins does not see) find them."""

from outlier_hydra.launch.launcher import AutoGpuLocalLauncher as _Local
from outlier_hydra.launch.launcher import RequeueAwareSlurmLauncher as _Slurm


class RequeueAwareSlurmLauncher(_Slurm):
    """hydra.launcher._target_: hydra_plugins.outlier_hydra_launcher.RequeueAwareSlurmLauncher"""


class AutoGpuLocalLauncher(_Local):
    """hydra.launcher._target_: hydra_plugins.outlier_hydra_launcher.AutoGpuLocalLauncher"""
