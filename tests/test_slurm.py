"""Against a real Slurm cluster (scripts/local_slurm.sh up: slurmctld, slurmd, slurmdbd + MariaDB):
sweeps become job arrays with correct results, shards merge to the single run, GPU jobs see
CUDA_VISIBLE_DEVICES, cancelled jobs are reported as failed, requeued jobs resume their batches."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_cfg, tiny_overrides

from outlier_hydra.pipeline import run


def _slurm_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


if not _slurm_up():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs the local Slurm cluster: scripts/local_slurm.sh up (make test starts it as root)")
    pytest.skip("no Slurm cluster here: run scripts/local_slurm.sh up (as root)", allow_module_level=True)

pytestmark = pytest.mark.slurm
SMALL = [
    "deployment=slurm",
    "deployment.cpus_per_task=1",
    "deployment.mem_gb=2",
    "deployment.gpus_per_node=0",
    "deployment.timeout_min=10",
    "progress=false",
]


def _sweep(sweep: Path, *args, check=True, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "outlier_hydra", "-m", *args, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _sacct(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"], capture_output=True, text=True
    ).stdout
    return dict(line.split("|", 1) for line in out.strip().splitlines())


def test_threshold_sweep_is_one_job_array_with_correct_results(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    _sweep(sweep, *tiny_overrides(tiny_models["olmoe"]), *SMALL, "analysis.magnitude_threshold=4,6")
    env0 = json.loads((sweep / "0" / "environment.json").read_text())
    env1 = json.loads((sweep / "1" / "environment.json").read_text())
    assert env0["slurm_array_job_id"] == env1["slurm_array_job_id"] is not None
    assert {env0["slurm_array_task_id"], env1["slurm_array_task_id"]} == {"0", "1"}
    # accounting lags the controller by a moment: poll it
    _wait_for(
        lambda: set(_sacct(env0["slurm_array_job_id"]).values()) == {"COMPLETED"}, 30, "accounting to record the array"
    )
    assert len(_sacct(env0["slurm_array_job_id"])) == 2
    for job, t in enumerate((4, 6)):
        local = run(
            make_cfg(*tiny_overrides(tiny_models["olmoe"], f"analysis.magnitude_threshold={t}")), tmp_path / f"local{t}"
        )
        assert json.loads((sweep / str(job) / "final_analysis_results.json").read_text()) == json.loads(json.dumps(local))
    assert len(json.loads((sweep / "sweep_summary.json").read_text())) == 2


def test_two_shards_on_slurm_merge_to_the_single_run(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    _sweep(
        sweep,
        *tiny_overrides(tiny_models["qwen3_moe"], "analysis.batch_size=2"),
        *SMALL,
        "dataset.num_shards=2",
        "dataset.shard_index=0,1",
    )
    run(make_cfg(*tiny_overrides(tiny_models["qwen3_moe"], "analysis.batch_size=2")), tmp_path / "single")
    for name in ["final_analysis_results.json"] + [f"batch_{b:03d}_results.json" for b in range(1, 5)]:
        assert json.loads((sweep / "merged" / name).read_text()) == json.loads((tmp_path / "single" / name).read_text()), (
            name
        )


def test_gpu_job_sees_cuda_visible_devices(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    _sweep(sweep, *tiny_overrides(tiny_models["olmoe"]), *SMALL, "deployment.gpus_per_node=2", "analysis.layers=[0],[1]")
    for job in ("0", "1"):
        env = json.loads((sweep / job / "environment.json").read_text())
        assert env["cuda_visible_devices"] == "0,1"


def _wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _running_job(submitit_dir: Path) -> str:
    """The Slurm job id of a one-job sweep (submitit names its folder after it)."""
    ids = [p.name for p in submitit_dir.iterdir() if p.is_dir()]
    assert len(ids) == 1, ids
    return ids[0]


def _start_slow_sweep(model, sweep: Path, *extra: str) -> subprocess.Popen:
    """A one-job sweep of 40 batches x 0.4 s in the background: still running when a signal comes
    (SIGKILL follows scancel / requeue after KillWait=2 on the local cluster)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    slow = tiny_overrides(
        model,
        "analysis.batch_size=1",
        "dataset.num_sequences=40",
        "analysis.collector._target_=doubles.SlowCollector",
        "allowed_targets=[doubles.]",
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "outlier_hydra",
            "-m",
            *slow,
            *SMALL,
            "analysis.magnitude_threshold=6",
            f"hydra.sweep.dir={sweep}",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cancelled_job_is_reported_as_failed_not_waited_on(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _start_slow_sweep(tiny_models["olmoe"], sweep)
    _wait_for(lambda: (sweep / "0" / "stats" / "batch_001.npz").exists(), 120, "the job to start collecting")
    job = _running_job(sweep / ".submitit")
    subprocess.run(["scancel", job.split("_")[0]], check=True)
    t0 = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 90, "the launcher noticed the cancellation through accounting"
    assert "CANCELLED" in stderr
    assert not (sweep / "0" / "final_analysis_results.json").exists()


def test_requeued_job_resumes_from_its_last_batch(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _start_slow_sweep(tiny_models["olmoe"], sweep)
    _wait_for(lambda: (sweep / "0" / "stats" / "batch_002.npz").exists(), 120, "two finished batches")
    job = _running_job(sweep / ".submitit")
    subprocess.run(["scontrol", "requeue", job], check=True)
    _release_when_pending(job)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    log = (sweep / "0" / "outlier_hydra.log").read_text()
    assert "resumed: " in log and " of 40 batches were already done" in log
    assert json.loads((sweep / "0" / "environment.json").read_text())["slurm_restart_count"] == "1"
    fresh = run(
        make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.batch_size=1", "dataset.num_sequences=40")),
        tmp_path / "fresh",
    )
    assert json.loads((sweep / "0" / "final_analysis_results.json").read_text()) == json.loads(json.dumps(fresh))


def test_a_request_the_partition_can_never_run_is_refused_before_submitting(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, *tiny_overrides(tiny_models["olmoe"]), *SMALL, "deployment.cpus_per_task=8", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "outlier_hydra: error: deployment.cpus_per_task=8 can never run: partition debug offers at most 2 CPUs, "
    ), proc.stderr
    assert "lower deployment.cpus_per_task" in lines[0]
    assert not (sweep / ".submitit").exists(), "nothing was submitted"


def test_a_job_that_can_never_start_is_cancelled_within_a_minute(tiny_models, tmp_path):
    """With the up-front check off, the job is submitted, pends for PartitionConfig, and the launcher
    stops the sweep, cancels the job, and names the keys and what the partition offers."""
    sweep = tmp_path / "sweep"
    t0 = time.time()
    proc = _sweep(
        sweep,
        *tiny_overrides(tiny_models["olmoe"]),
        *SMALL,
        "deployment.check_resources=false",
        "deployment.cpus_per_task=8",
        check=False,
    )
    assert time.time() - t0 < 60
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    assert "Slurm cannot start job" in errors[0] and "pending for PartitionConfig" in errors[0]
    assert "change deployment.partition, deployment.cpus_per_task" in errors[0] and "offers at most 2 CPUs" in errors[0]
    job = _running_job(sweep / ".submitit")
    _wait_for(lambda: _sacct(job).get(job, "").startswith("CANCELLED"), 30, "accounting to record the cancellation")


def _release_when_pending(job: str) -> None:
    """Slurm holds a requeued job for ~2 minutes before it is eligible again; release it now."""
    _wait_for(
        lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        == "PENDING",
        60,
        "the requeued job to be pending",
    )
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)


def test_timeout_signal_checkpoints_requeues_and_counts_against_max_num_timeout(tiny_models, tmp_path):
    """The time-limit path for real: Slurm's USR2 (sent here with scancel --signal, as --signal=USR2@120
    sends it before a time limit) makes submitit checkpoint the job through the project's launcher and
    requeue it; the rerun resumes its batches. With timeout_min=10 every such signal counts as a
    timeout, and deployment.max_num_timeout=1 allows one: the second signal ends the job."""
    sweep = tmp_path / "sweep"
    proc = _start_slow_sweep(tiny_models["olmoe"], sweep, "deployment.max_num_timeout=1")
    _wait_for(lambda: (sweep / "0" / "stats" / "batch_002.npz").exists(), 120, "two finished batches")
    job = _running_job(sweep / ".submitit")
    first_signal = time.time()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _release_when_pending(job)

    def batches():
        return len(list((sweep / "0" / "stats").glob("batch_*.npz")))

    done = batches()
    _wait_for(lambda: batches() > done, 120, "the requeued run to collect its next batch")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "timed-out too many times" in stderr
    logs = "".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.err"))
    assert logs.count("Caught signal SIGUSR2") == 2 and logs.count("this job is timed-out") == 2
    assert not (sweep / "0" / "final_analysis_results.json").exists()
    # the requeued run resumed: the batches before the first signal were not collected again
    assert (sweep / "0" / "stats" / "batch_001.npz").stat().st_mtime < first_signal
