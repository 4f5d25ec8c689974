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
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED"}
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


class RequeueAwareSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        params = self.params
        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k not in init_keys}
        )
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
