"""Faults injected for real where this machine allows it (a full tmpfs, bit flips, truncation, a
second process, a stale lock), and at the exception boundary where it does not (CUDA OOM without a
GPU). Each asserts the one-line message, the exit code, the files left, and identical results after
recovery. The README's fault table lists the same cases."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, make_cfg, tiny_overrides

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.pipeline import cache, run

BATCHES = 8


def _cli(*args, env=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "outlier_hydra", *args], capture_output=True, text=True, cwd=REPO, env=env, **kw
    )


def _args(model, out, *extra):
    return [*tiny_overrides(model, "analysis.batch_size=1", *extra), f"hydra.run.dir={out}", "progress=false"]


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("outlier_hydra: error: "), proc.stderr[-3000:]
    return lines[0]


def _no_partial_files(out):
    assert not list(out.rglob(".*.tmp-*")), "a temporary file was left behind"
    assert not (out / "final_analysis_results.json").exists()


@pytest.fixture
def fresh(tiny_models, tmp_path):
    """The results of an uninterrupted run, to compare recoveries with."""
    return json.loads(
        json.dumps(run(make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.batch_size=1")), tmp_path / "fresh"))
    )


def _final(out):
    return json.loads((out / "final_analysis_results.json").read_text())


def test_out_of_memory_in_the_forward_ends_with_one_line_and_the_rerun_resumes(tiny_models, tmp_path, fresh):
    out = tmp_path / "run"
    oom = ["analysis.collector._target_=doubles.OomInForward", "allowed_targets=[doubles.]"]
    proc = _cli(*_args(tiny_models["olmoe"], out, *oom), env={"OH_TEST_OOM_AT_BATCH": "3"})
    line = _error_line(proc)
    assert line == (
        f"outlier_hydra: error: out of memory on the host in batch 3 of {BATCHES}; 2 batches are saved in "
        f"{out / 'stats'} and a rerun resumes from them: lower analysis.batch_size (now 1) or spread the model "
        "over more memory (model.device_map, model.max_memory)"
    )
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["batch_001.npz", "batch_002.npz"]
    _no_partial_files(out)
    rerun = _cli(*_args(tiny_models["olmoe"], out, *oom))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed: 2 of {BATCHES} batches" in (out / "outlier_hydra.log").read_text()
    assert _final(out) == fresh


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (make test as root, as CI runs it)")
def test_a_full_disk_keeps_every_finished_batch_and_the_rerun_resumes(tiny_models, tmp_path, fresh):
    # how much a run writes before its batches, and per batch, measured on a normal disk
    page = 4096

    def pages(path):
        return -(-path.stat().st_size // page) * page

    reference = tmp_path / "fresh"
    before = sum(
        pages(p) for p in reference.iterdir() if p.is_file() and p.name in ("token_ids.npy", "run_state.json", "config.json")
    )
    per_batch = max(pages(p) for p in (reference / "stats").iterdir())
    mount = tmp_path / "small_disk"
    mount.mkdir()
    size = before + 64 * 1024 + 3 * per_batch + per_batch // 2  # Hydra's own files and the log, then ~3 batches
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        out = mount / "run"
        proc = _cli(*_args(tiny_models["olmoe"], out))
        line = _error_line(proc)
        saved = sorted(p.name for p in (out / "stats").iterdir())
        assert 1 <= len(saved) < BATCHES, saved
        assert line.startswith("outlier_hydra: error: ") and "no space left on the device" in line
        assert f"{len(saved)} batches are saved in {out / 'stats'}: free space and rerun to resume" in line
        _no_partial_files(out)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        rerun = _cli(*_args(tiny_models["olmoe"], out))
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"resumed: {len(saved)} of {BATCHES} batches" in (out / "outlier_hydra.log").read_text()
        assert _final(out) == fresh
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _damage(run_dir, other_run):
    """batch 2 truncated, batch 3 bit-flipped, batch 4 from another config, batch 5 of another format."""
    stats = run_dir / "stats"
    data = (stats / "batch_002.npz").read_bytes()
    (stats / "batch_002.npz").write_bytes(data[: len(data) // 2])
    data = bytearray((stats / "batch_003.npz").read_bytes())
    data[len(data) // 2] ^= 0x10
    (stats / "batch_003.npz").write_bytes(bytes(data))
    shutil.copy(other_run / "stats" / "batch_004.npz", stats / "batch_004.npz")
    from outlier_hydra.stats.outlier_stats import _checksum

    with np.load(stats / "batch_005.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    meta.update(format_version=3, sha256=_checksum(arrays))
    np.savez(stats / "batch_005.npz", meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def test_damaged_statistics_are_detected_moved_aside_and_collected_again(tiny_models, tmp_path, fresh, caplog):
    model = tiny_models["olmoe"]
    out = tmp_path / "run"
    run(make_cfg(*tiny_overrides(model, "analysis.batch_size=1")), out)
    run(make_cfg(*tiny_overrides(model, "analysis.batch_size=1", "analysis.histogram_edges=[2,6]")), tmp_path / "other")
    _damage(out, tmp_path / "other")

    # merge and reanalyze refuse, naming the file
    for args in (
        ["reanalyze", str(out), "analysis.magnitude_threshold=4"],
        ["merge", str(out), "--out", str(tmp_path / "m")],
    ):
        proc = _cli(*args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"{out / 'stats' / 'batch_002.npz'}: damaged statistics file" in proc.stderr
    assert not (tmp_path / "m").exists()

    # a rerun warns (naming each file and why), moves each aside, collects those batches again
    with caplog.at_level("WARNING"):
        resumed = json.loads(json.dumps(run(make_cfg(*tiny_overrides(model, "analysis.batch_size=1")), out)))
    assert resumed == fresh
    stats = out / "stats"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for name, why in (
        ("batch_002.npz", "damaged statistics file"),
        ("batch_003.npz", "damaged statistics file"),
        ("batch_004.npz", "made by another config"),
        ("batch_005.npz", "statistics format 3, this version reads 5"),
    ):
        assert any(w.startswith(f"{stats / name}: {why}") and "moved aside" in w for w in warnings), (name, warnings)
    assert sorted(p.name for p in stats.glob("*.damaged-*")) == [f"batch_00{i}.npz.damaged-0" for i in (2, 3, 4, 5)]
    assert sorted(p.name for p in stats.glob("batch_*.npz")) == [f"batch_{i:03d}.npz" for i in range(1, 9)]


def test_a_second_run_into_the_same_directory_refuses_at_once(tiny_models, tmp_path):
    out = tmp_path / "run"
    # 24 batches of 0.4 s or more: the first run is still writing when the second one starts
    slow = ["analysis.collector._target_=doubles.SlowCollector", "allowed_targets=[doubles.]", "dataset.num_sequences=24"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    first = subprocess.Popen(
        [sys.executable, "-m", "outlier_hydra", *_args(tiny_models["olmoe"], out, *slow)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "stats" / "batch_001.npz").exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    t0 = time.time()
    second = _cli(*_args(tiny_models["olmoe"], out, *slow))
    line = _error_line(second)
    assert time.time() - t0 < 30
    assert f"{out}: another run is writing here (pid {first.pid} on {socket.gethostname()}" in line
    assert line.endswith("wait for it to end or use a new hydra.run.dir")
    assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    fresh = run(
        make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.batch_size=1", "dataset.num_sequences=24")),
        tmp_path / "fresh",
    )
    assert _final(out) == json.loads(json.dumps(fresh))
    assert not (out / ".lock").exists(), "the lock is released at the end"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "holder,age_s,taken_over",
    [
        ({"host": socket.gethostname(), "pid": "dead"}, 0, True),  # killed on this host
        ({"host": "elsewhere", "pid": 1}, 600, True),  # another host, no heartbeat for 10 minutes
        ({"host": "elsewhere", "pid": 1}, 0, False),  # another host, alive
        ({"host": "elsewhere", "pid": 1, "slurm_job_id": "4242"}, 0, True),  # this Slurm job, requeued
    ],
)
def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(holder, age_s, taken_over, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    lock.write_text(
        json.dumps({**holder, "pid": _dead_pid() if holder["pid"] == "dead" else holder["pid"], "started": "earlier"})
    )
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    cfg = make_cfg(*tiny_overrides(tiny_models["olmoe"], "dataset.num_sequences=4"))
    if taken_over:
        assert run(cfg, out)["num_tokens"] == 4 * 32
        assert not lock.exists() and not list(out.glob(".lock*"))
    else:
        with pytest.raises(OutlierHydraError, match=r"another run is writing here \(pid 1 on elsewhere, since earlier\)"):
            run(cfg, out)
        assert not (out / "stats").exists()


def test_concurrent_publishers_of_one_cache_entry_never_mix(tmp_path):
    """Two array jobs publishing the same statistics-cache entry: the first complete one wins."""
    import threading

    sources = []
    for s in range(2):
        d = tmp_path / f"stats{s}"
        d.mkdir()
        for b in range(20):
            (d / f"batch_{b + 1:03d}.npz").write_bytes(bytes([s]) * 20_000)
        sources.append(d)
    ids = np.zeros((2, 4), np.int64)
    threads = [threading.Thread(target=cache.store, args=(tmp_path / "cache", "k", ids, d)) for d in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entry = tmp_path / "cache" / "k"
    contents = {(entry / f"batch_{b + 1:03d}.npz").read_bytes() for b in range(20)}
    assert len(contents) == 1 and (entry / "complete").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k"], "no temporary folder left behind"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (make test as root, as CI runs it)")
def test_final_results_and_plots_on_a_full_disk_leave_the_old_file_and_no_temporary(tmp_path):
    """The final JSON and the plots go through the same atomic write as the batches."""
    from outlier_hydra.figures import pyplot, save_figure
    from outlier_hydra.files import NoSpace, write_json

    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        write_json(mount / "final_analysis_results.json", {"old": True})
        (mount / "filler").write_bytes(b"x" * (64 * 1024 - 3 * 4096))
        with pytest.raises(NoSpace, match=r"final_analysis_results\.json: no space left on the device"):
            write_json(mount / "final_analysis_results.json", {"new": "x" * 100_000})
        assert json.loads((mount / "final_analysis_results.json").read_text()) == {"old": True}
        fig, ax = pyplot().subplots(figsize=(20, 20), dpi=100)
        ax.imshow(np.random.default_rng(0).random((400, 400)))
        with pytest.raises(NoSpace, match=r"plot\.png: no space left on the device"):
            save_figure(fig, mount / "plot.png")
        assert sorted(p.name for p in mount.iterdir()) == ["filler", "final_analysis_results.json"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)
