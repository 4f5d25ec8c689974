"""Runs survive SIGKILL: a rerun in the same directory finishes the work with identical results;
a rerun with another config refuses instead of mixing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, make_cfg, tiny_overrides

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.pipeline import run


def _args(model, out):
    return [
        *tiny_overrides(model, "analysis.batch_size=1", "analysis.collector._target_=doubles.SlowCollector"),
        "allowed_targets=[doubles.]",
        f"hydra.run.dir={out}",
        "progress=false",
    ]


def test_killed_run_resumes_to_identical_results(tiny_models, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "outlier_hydra", *_args(tiny_models["olmoe"], out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (out / "stats" / "batch_002.npz").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "stats").glob("batch_*.npz"))
    assert 2 <= len(done) < 8, done
    assert not (out / "final_analysis_results.json").exists()
    for p in out.glob("batch_*_results.json"):
        json.loads(p.read_text())  # never half-written

    rerun = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", *_args(tiny_models["olmoe"], out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed: {len(done)} of 8 batches" in (out / "outlier_hydra.log").read_text()
    assert not list(out.rglob(".*.tmp-*")), "stale temporary files are cleaned up"

    fresh = run(make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.batch_size=1")), tmp_path / "fresh")
    resumed = json.loads((out / "final_analysis_results.json").read_text())
    assert resumed == json.loads(json.dumps(fresh))
    for b in range(8):
        json.loads((out / f"batch_{b + 1:03d}_results.json").read_text())


def test_rerun_with_another_config_refuses(tiny_models, tmp_path):
    run(make_cfg(*tiny_overrides(tiny_models["olmoe"])), tmp_path)
    before = (tmp_path / "final_analysis_results.json").read_text()
    with pytest.raises(OutlierHydraError, match=r"holds a run with a different config \(analysis\.magnitude_threshold"):
        run(make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.magnitude_threshold=5")), tmp_path)
    assert (tmp_path / "final_analysis_results.json").read_text() == before


def test_finished_run_reruns_without_loading_the_model(tiny_models, tmp_path, monkeypatch):
    import outlier_hydra.pipeline.plan as plan_module

    first = run(make_cfg(*tiny_overrides(tiny_models["qwen3_moe"])), tmp_path)
    monkeypatch.setattr(plan_module, "load_model", lambda *a: pytest.fail("nothing left to collect"))
    assert run(make_cfg(*tiny_overrides(tiny_models["qwen3_moe"])), tmp_path) == first
