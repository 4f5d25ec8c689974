"""The installed command, run as a user runs it: the offline default and a real `-m` sweep."""

import json
import os
import subprocess
import sys

from conftest import REPO


def _cli(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "outlier_hydra", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_default_run_completes_offline_on_the_real_model(tmp_path):
    proc = _cli(f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "final_analysis_results.json").read_text())
    assert results["model"]["model_type"] == "bert" and results["num_hooked_modules"] == 12
    assert results["num_tokens"] == 8 * 128
    dims = {r["feature_dim"] for r in results["systematic_outliers"]}
    assert 223 in dims, "MiniLM's best-known outlier dim"
    for name in ("batch_001_results.json", "batch_002_results.json", "token_ids.npy", "config.json",
                 "outlier_hydra.log", ".hydra/config.yaml"):
        assert (tmp_path / name).exists(), name
    assert "systematic outlier features" in proc.stdout  # the summary table
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["analysis"]["magnitude_threshold"] == 6.0 and config["model"]["dtype"] == "float32"
