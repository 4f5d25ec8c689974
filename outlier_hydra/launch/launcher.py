"""hydra-submitit-launcher's Slurm launcher, with one change: it asks Slurm itself whether a job is
still queued before believing that it finished.

submitit decides that a job is done from `sacct`, Slurm's accounting. Right after a requeue (a
pre-emption, a timeout the job checkpointed, `scontrol requeue`), accounting can still show the old
run's final state for a moment; submitit then finds no result, raises, and the sweep fails while
the requeued job runs on and finishes. This launcher waits on the controller (`squeue`, no
accounting lag) until the job has left the queue or written its result, and only then collects the
results the usual way. The deployment configs select it (hydra.launcher._target_); it is installed
as hydra_plugins.outlier_hydra_launcher, since Hydra takes launchers only from that namespace.

`launch` follows hydra-submitit-launcher 1.2.0's (MIT license): same parameters, same job arrays.

Both launchers here also resolve ``gpus_per_node: auto`` (deployment.gpus_per_node) when they submit,
from the VRAM estimate of the sweep's model (launch/vram.py): composing a config never reads a model
config or reaches the hub. A request no allowed GPU count can hold ends the sweep with one line.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "PREEMPTED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}
GRACE_S = 10  # after the job left the queue, how long its result file may take to appear


def slurm_state(job_id: str) -> str | None:
    """The controller's state of a job (None once it has been purged or squeue is unavailable)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = out.stdout.split()
    return states[0] if out.returncode == 0 and states else None


def wait_until_settled(job, poll_s: float = 1.0) -> None:
    """Return once the job wrote its result or Slurm no longer holds it as queued or running."""
    left_at = None
    while not job.paths.result_pickle.exists():
        state = slurm_state(job.job_id)
        if state in ACTIVE:
            left_at = None
        else:
            left_at = left_at or time.monotonic()
            if time.monotonic() - left_at > GRACE_S:
                return
        time.sleep(poll_s)


def resolved_params(params: dict, config) -> dict:
    """The launcher's parameters with gpus_per_node=auto replaced by the count the model needs."""
    params = dict(params)
    if str(params.get("gpus_per_node")) == "auto":
        from outlier_hydra.errors import OutlierHydraError
        from outlier_hydra.launch.vram import gpus_per_node

        try:
            params["gpus_per_node"] = gpus_per_node(config)
        except OutlierHydraError as exc:
            print(f"outlier_hydra: error: {exc}", file=sys.stderr)
            sys.exit(2)
    return params


def executor_parameters(params: dict, executor_name: str) -> dict:
    """hydra-submitit-launcher's mapping of launcher keys to submitit's update_parameters()."""
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    return {
        k if k in base else f"{executor_name}_{k}": v
        for k, v in params.items()
        if k not in ("max_num_timeout", "submitit_folder")
    }


class AutoGpuLocalLauncher(LocalLauncher):
    """submitit's local executor (deployment=submitit_local), with gpus_per_node=auto resolved."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.params = resolved_params(self.params, self.config)  # type: ignore[has-type]
        return super().launch(job_overrides, initial_job_idx)


class RequeueAwareSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        params = resolved_params(self.params, self.config)
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
        )
        executor.update_parameters(**executor_parameters(params, self._EXECUTOR))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        job_params: list[Any] = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        for job in jobs:
            wait_until_settled(job)
        return [job.results()[0] for job in jobs]


@dataclass
class SlurmConf(SlurmQueueConf):
    """hydra/launcher=outlier_slurm (the slurm deployments): gpus_per_node may be "auto"."""

    _target_: str = "hydra_plugins.outlier_hydra_launcher.RequeueAwareSlurmLauncher"
    gpus_per_node: Any = None


@dataclass
class LocalConf(LocalQueueConf):
    """hydra/launcher=outlier_submitit_local (deployment=submitit_local): gpus_per_node may be "auto"."""

    _target_: str = "hydra_plugins.outlier_hydra_launcher.AutoGpuLocalLauncher"
    gpus_per_node: Any = None
