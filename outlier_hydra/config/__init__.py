"""Config: the typed schema (schema.py), where the config tree lives (paths.py), range checks before
anything loads (validate.py), the allowed `_target_`s (targets.py) and Hydra's runtime (runtime.py).

Registration with Hydra is outlier_hydra/registration.py: it names the stages and launchers, which sit
above this room.
"""

from outlier_hydra.config.paths import config_dir, corpus_path

__all__ = ["config_dir", "corpus_path"]
