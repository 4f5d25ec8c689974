"""One run per directory: an exclusive lock that works on shared filesystems (NFS, Lustre).

The lock is ``<run dir>/.lock``, created with a hard link from a unique temporary file: link() is
atomic on local disks and on NFS/Lustre alike (O_EXCL and flock are not reliable on every NFS). It
records who holds it (host, pid, Slurm job id, start time), and its holder touches it every
``HEARTBEAT_S`` seconds. A lock is stale, and is taken over, when its holder is gone: the same host
and a dead pid, the same Slurm job (a requeued job is the same job), or a heartbeat older than
``STALE_AFTER_S`` from another host. Taking over renames the stale lock away first, so that of two
processes that both find it stale only one can take it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from outlier_hydra.errors import OutlierHydraError

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(holder: dict, age_s: float) -> bool:
    me = _me()
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return True  # this job, requeued: its earlier run is gone
    if holder.get("host") == me["host"]:
        return not _alive(int(holder.get("pid", -1)))
    return age_s > STALE_AFTER_S


class RunLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_link():
                self._start_heartbeat()
                return
            holder, age = self._holder()
            if holder is None:
                continue  # released or being taken over right now: try again
            if not _stale(holder, age):
                raise OutlierHydraError(
                    f"{self.path.parent}: another run is writing here (pid {holder.get('pid')} on {holder.get('host')}"
                    f"{', Slurm job ' + holder['slurm_job_id'] if holder.get('slurm_job_id') else ''}, since "
                    f"{holder.get('started')}); wait for it to end or use a new hydra.run.dir"
                )
            try:  # only one of several processes that found it stale wins this rename
                os.rename(self.path, self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
            except FileNotFoundError:
                continue
            for old in self.path.parent.glob(f"{LOCK}.stale-*"):
                old.unlink(missing_ok=True)
        raise OutlierHydraError(f"{self.path}: could not take the run directory's lock; try again")

    def _try_link(self) -> bool:
        tmp = self.path.with_name(f"{LOCK}.{socket.gethostname()}.{os.getpid()}")
        tmp.write_text(json.dumps(_me()))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text()), age
        except (FileNotFoundError, json.JSONDecodeError):
            return None, 0.0

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._beat = threading.Thread(target=beat, name="outlier_hydra-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder, _ = self._holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
