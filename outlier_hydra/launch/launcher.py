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

from outlier_hydra.launch import slurm

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


class JobCannotStart(Exception):
    pass


def watch(jobs, poll_s: float = 1.0, partition: str | None = None) -> None:
    """Return once every job wrote its result or left Slurm's queue (squeue, no accounting lag).
    Shows progress when it changes (pending with their reasons, running, done); raises
    JobCannotStart as soon as a job waits for a reason that never clears on its own."""
    left_at: dict[str, float] = {}  # when a job was last seen out of the queue without a result
    settled: set[str] = set()
    shown = None
    while True:
        waiting = [j for j in jobs if j.job_id not in settled and not j.paths.result_pickle.exists()]
        if not waiting:
            return
        status = slurm.queue_status([j.job_id for j in waiting]) or {}
        for job in waiting:
            state, reason = status.get(job.job_id, ("", ""))
            meaning = slurm.never_clears(reason, partition) if state == "PENDING" else None
            if meaning:
                raise JobCannotStart(f"Slurm cannot start job {job.job_id}: pending for {reason} ({meaning})")
            if state in ACTIVE:
                left_at.pop(job.job_id, None)
            elif time.monotonic() - left_at.setdefault(job.job_id, time.monotonic()) > GRACE_S:
                settled.add(job.job_id)  # gone without a result: results() reports the failure
        counts: dict[str, int] = {}
        for state, reason in status.values():
            label = f"{state.lower()} ({reason})" if state == "PENDING" and reason not in ("", "None") else state.lower()
            counts[label] = counts.get(label, 0) + 1
        done = len(jobs) - len(waiting)
        line = ", ".join(f"{n} {label}" for label, n in sorted(counts.items())) + f", {done} done"
        if line != shown:
            log.info("slurm: %s", line)
            shown = line
        time.sleep(poll_s)


def wait_until_settled(job, poll_s: float = 1.0) -> None:
    """One job: return once it wrote its result or Slurm no longer holds it (see watch)."""
    watch([job], poll_s)


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
        partition = params.get("partition")
        if self.config.get("deployment", {}).get("check_resources", True):
            problem = slurm.request_problem(params)
            if problem:
                print(f"outlier_hydra: error: {problem}", file=sys.stderr)
                sys.exit(2)
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
        try:
            watch(jobs, partition=partition)
        except JobCannotStart as exc:
            slurm.cancel([job.job_id for job in jobs])
            limits = slurm.partition_limits(partition)
            offer = f"; {limits.describe()}" if limits else ""
            print(f"outlier_hydra: error: {exc}; its jobs are cancelled: change {slurm.KEYS}{offer}", file=sys.stderr)
            sys.exit(2)
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
