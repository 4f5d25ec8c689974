"""Threshold sweeps cost one forward pass: a real `-m` sweep loads the model once and equals separate
runs; reanalysis of a finished run equals a fresh run; statistics are never reused across runs that
would see different activations."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_cfg, tiny_overrides

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.pipeline import cache, run
from outlier_hydra.pipeline.plan import plain_config
from outlier_hydra.tools.reanalyze import reanalyze

THRESHOLDS = (4.0, 6.0, 8.0)


def _strip(results):
    return json.loads(json.dumps(results))


def _multirun(sweep, *overrides):
    """A real `-m` sweep through the command line, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "outlier_hydra", "-m", *overrides, f"hydra.sweep.dir={sweep}", "progress=false"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_threshold_sweep_loads_the_model_once_and_equals_separate_runs(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _multirun(sweep, *tiny_overrides(tiny_models["olmoe"]), "analysis.magnitude_threshold=4,6,8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [(sweep / str(j) / "outlier_hydra.log").read_text() for j in range(3)]
    assert sum("loading " in log for log in logs) == 1, "the model is loaded by the first job only"
    assert all("reusing statistics" in log for log in logs[1:])

    for job, t in enumerate(THRESHOLDS):
        swept = json.loads((sweep / str(job) / "final_analysis_results.json").read_text())
        separate = run(
            make_cfg(*tiny_overrides(tiny_models["olmoe"], f"analysis.magnitude_threshold={t}")), tmp_path / f"sep{job}"
        )
        assert swept == _strip(separate)
        for b in (1, 2):
            name = f"batch_{b:03d}_results.json"
            assert json.loads((sweep / str(job) / name).read_text()) == json.loads(
                (tmp_path / f"sep{job}" / name).read_text()
            )

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["magnitude_threshold"] for r in summary] == list(THRESHOLDS)
    for row in summary:
        r = json.loads((sweep / row["job"] / "final_analysis_results.json").read_text())
        assert row["num_systematic_outliers"] == r["num_systematic_outliers"]
        assert row["top_dims"] == [f["feature_dim"] for f in r["systematic_outliers"]][:5]
        assert row["top_seq_percentages"] == [f["seq_percentage"] for f in r["systematic_outliers"]][:5]
    with open(sweep / "sweep_summary.csv") as f:
        assert [int(r["num_systematic_outliers"]) for r in csv.DictReader(f)] == [
            r["num_systematic_outliers"] for r in summary
        ]
    assert (sweep / "sweep_systematic_vs_threshold.png").stat().st_size > 10_000
    counts = [r["num_systematic_outliers"] for r in summary]
    assert counts == sorted(counts, reverse=True) and counts[1] == 2


def test_sweep_summary_command_after_the_fact(tiny_models, tmp_path):
    for i, t in enumerate((5.0, 7.0)):
        d = tmp_path / str(i)
        run(make_cfg(*tiny_overrides(tiny_models["olmoe"], f"analysis.magnitude_threshold={t}")), d)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(f"- analysis.magnitude_threshold={t}\n")
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a job that never finished
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", "sweep-summary", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["done", "done", "not finished"]
    assert [r.get("magnitude_threshold") for r in rows] == [5.0, 7.0, None]


@pytest.mark.parametrize(
    "overrides",
    [
        ["analysis.magnitude_threshold=4", "analysis.min_seq_percentage=0.1"],
        ["analysis.min_layer_percentage=0.5"],
        ["analysis.magnitude_threshold=12", "analysis.num_examples=3"],
    ],
)
def test_reanalysis_equals_a_fresh_run(overrides, tiny_models, tmp_path):
    run(make_cfg(*tiny_overrides(tiny_models["mixtral"])), tmp_path / "base")
    results, out = reanalyze(tmp_path / "base", overrides)
    fresh = run(make_cfg(*tiny_overrides(tiny_models["mixtral"], *overrides)), tmp_path / "fresh")
    assert _strip(results) == _strip(fresh)
    for b in (1, 2):
        name = f"batch_{b:03d}_results.json"
        assert json.loads((out / name).read_text()) == json.loads((tmp_path / "fresh" / name).read_text())


def test_reanalysis_refuses_what_it_cannot_answer(tiny_models, tmp_path):
    run(make_cfg(*tiny_overrides(tiny_models["mixtral"])), tmp_path)
    with pytest.raises(OutlierHydraError, match=r"6\.5 is not a histogram edge .*edges: 3, 4, 5, 6, 7"):
        reanalyze(tmp_path, ["analysis.magnitude_threshold=6.5"])
    with pytest.raises(OutlierHydraError, match=r"analysis\.layers: reanalysis changes only"):
        reanalyze(tmp_path, ["analysis.layers=[1]"])
    with pytest.raises(OutlierHydraError, match=r"analysis\.num_examples: the run kept 5"):
        reanalyze(tmp_path, ["analysis.num_examples=9"])


def test_custom_edge_makes_a_threshold_sweepable(tiny_models, tmp_path):
    run(make_cfg(*tiny_overrides(tiny_models["mixtral"], "analysis.histogram_edges=[2,6.5,9]")), tmp_path / "base")
    results, _ = reanalyze(tmp_path / "base", ["analysis.magnitude_threshold=6.5"])
    fresh = run(make_cfg(*tiny_overrides(tiny_models["mixtral"], "analysis.magnitude_threshold=6.5")), tmp_path / "fresh")
    assert _strip(results)["systematic_outliers"] == _strip(fresh)["systematic_outliers"]


def test_cache_key_separates_whatever_changes_the_activations(tiny_models):
    base = tiny_overrides(tiny_models["olmoe"])
    edges = np.array([2.0, 6.0])

    def key(*extra, edges=edges):
        return cache.cache_key(plain_config(make_cfg(*base, *extra)), edges, "outlier_hydra.collect.OutlierCollector")

    same = key()
    assert key("analysis.magnitude_threshold=8", "analysis.min_seq_percentage=0.2") == same
    for extra in (
        ["model.dtype=bfloat16"],
        ["model.name=/elsewhere"],
        ["dataset.sequence_length=16"],
        ["dataset.skip_sequences=1"],
        ["dataset.seed=3", "dataset.shuffle=true"],
        ["analysis.layers=[0,1]"],
        ["analysis.batch_size=2"],
    ):
        assert key(*extra) != same, extra
    assert key(edges=np.array([2.0, 6.0, 7.0])) != same


def test_cache_refuses_an_entry_with_other_tokens(tmp_path):
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "batch_001.npz").write_bytes(b"x")
    cache.store(tmp_path / "cache", "k", np.zeros((2, 4), np.int64), stats)
    assert not cache.fetch(tmp_path / "cache", "k", np.ones((2, 4), np.int64), tmp_path / "s2")
    assert cache.fetch(tmp_path / "cache", "k", np.zeros((2, 4), np.int64), tmp_path / "s3")
    assert (tmp_path / "s3" / "batch_001.npz").read_bytes() == b"x"


def test_submitit_local_deployment_runs_each_job_in_its_own_process(tiny_models, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _multirun(
        sweep,
        "deployment=submitit_local",
        *tiny_overrides(tiny_models["olmoe"]),
        "dataset.num_sequences=4",
        "analysis.magnitude_threshold=4,6",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["status"] for r in json.loads((sweep / "sweep_summary.json").read_text())] == ["done", "done"]
    assert len({json.loads((sweep / j / "environment.json").read_text())["hostname"] for j in "01"}) == 1
    assert list((sweep / ".submitit").iterdir()), "submitit ran the jobs"
