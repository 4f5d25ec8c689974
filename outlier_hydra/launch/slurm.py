"""What the Slurm controller says: a partition's limits, jobs' states and pending reasons.

Used by the launcher to refuse a request the partition can never run (before submitting), and to
stop a sweep whose jobs wait for a reason that cannot clear on its own (instead of waiting forever).
Every query has a timeout; when Slurm's commands are missing or fail, the answer is None and the
launcher goes on as plain submitit would.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

# Pending reasons that never clear by themselves: the request exceeds what the partition, the QOS
# or the association allows, or names something that does not exist.
NEVER_CLEARS = {
    "PartitionConfig": "the request exceeds what the partition's nodes have",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a time limit above the partition's",
    "BadConstraints": "constraints no node satisfies",
    "InvalidAccount": "an account that does not exist or is not yours",
    "InvalidQOS": "a QOS that does not exist or is not allowed",
}
PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*PerJob\w*$|^(QOS|Assoc)MaxWallDurationPerJobLimit$")
KEYS = "deployment.partition, deployment.cpus_per_task, deployment.mem_gb, deployment.gpus_per_node, deployment.timeout_min"


def _run(args: list[str]) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@dataclass
class PartitionLimits:
    name: str
    cpus: int  # per node
    mem_mb: int  # per node
    gpus: int  # per node
    time_limit_min: float | None  # None: infinite
    nodes_up: int

    def describe(self) -> str:
        limit = "no time limit" if self.time_limit_min is None else f"a time limit of {self.time_limit_min:g} min"
        return (
            f"partition {self.name} offers at most {self.cpus} CPUs, {self.mem_mb} MB memory and "
            f"{self.gpus} GPUs per node, and {limit}"
        )


def _minutes(limit: str) -> float | None:
    """Slurm's time format (infinite, D-HH:MM:SS, HH:MM:SS, MM:SS, MM) -> minutes."""
    if limit in ("infinite", "UNLIMITED", "NONE"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def _gpus(gres: str) -> int:
    """gpu:2, gpu:a100:4(S:0-1), gpu:2,shard:8 -> the GPU count."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partition_limits(partition: str | None) -> PartitionLimits | None:
    """The largest node of the partition (the default one when None), or None if unknown."""
    out = _run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%l|%T"])
    if out is None:
        return None
    rows = [line.split("|") for line in out.strip().splitlines() if line.count("|") == 5]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")]
    else:
        rows = [r for r in rows if r[0].rstrip("*") == partition]
    if not rows:
        return None
    up = ("idle", "mix", "mixed", "alloc", "allocated", "completing", "planned")
    return PartitionLimits(
        name=rows[0][0].rstrip("*"),
        cpus=max(int(r[1].rstrip("+")) for r in rows),
        mem_mb=max(int(r[2].rstrip("+")) for r in rows),
        gpus=max(_gpus(r[3]) for r in rows),
        time_limit_min=_minutes(rows[0][4]),
        nodes_up=sum(1 for r in rows if r[5].rstrip("*~#!%$@^-") in up),
    )


def partitions() -> list[str]:
    out = _run(["sinfo", "-h", "-o", "%P"])
    return sorted({p.rstrip("*") for p in (out or "").split()})


def request_problem(params: dict) -> str | None:
    """Why the partition can never run this request (one line naming the keys), or None."""
    partition = params.get("partition")
    limits = partition_limits(partition)
    if limits is None:
        known = partitions()
        if partition and known:
            return f"deployment.partition={partition}: no such partition (partitions: {', '.join(known)})"
        return None
    tasks = params.get("tasks_per_node") or 1
    checks = [
        ("deployment.cpus_per_task", params.get("cpus_per_task"), (params.get("cpus_per_task") or 1) * tasks > limits.cpus),
        ("deployment.mem_gb", params.get("mem_gb"), (params.get("mem_gb") or 0) * 1024 > limits.mem_mb),
        ("deployment.gpus_per_node", params.get("gpus_per_node"), int(params.get("gpus_per_node") or 0) > limits.gpus),
        (
            "deployment.timeout_min",
            params.get("timeout_min"),
            limits.time_limit_min is not None and (params.get("timeout_min") or 0) > limits.time_limit_min,
        ),
    ]
    for key, value, too_much in checks:
        if too_much:
            return f"{key}={value} can never run: {limits.describe()}; lower {key} or choose another deployment.partition"
    return None


def queue_status(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """job id -> (state, pending reason), one line per array task; None if squeue is unavailable."""
    if not job_ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    if out is None:
        return None
    status = {}
    for line in out.strip().splitlines():
        job_id, state, reason = (line.split("|", 2) + ["", ""])[:3]
        status[job_id] = (state, reason)
    return status


def never_clears(reason: str, partition: str | None) -> str | None:
    """What a pending reason means when it cannot clear on its own, else None."""
    head = reason.split(",")[0].strip()
    if head in NEVER_CLEARS:
        return NEVER_CLEARS[head]
    if PER_JOB_LIMIT.match(head):
        return "a per-job limit of the QOS or association"
    if head == "ReqNodeNotAvail":
        limits = partition_limits(partition)
        if limits is not None and limits.nodes_up == 0:
            return "no node of the partition is up"
    return None


def cancel(job_ids: list[str]) -> None:
    arrays = sorted({j.split("_")[0] for j in job_ids})
    _run(["scancel", *arrays])
