"""compare over the planted OLMoE, Qwen3-MoE and Mixtral runs and the MiniLM run: its numbers equal
the runs' own JSON; runs at other criteria are refused unless --reanalyze applies one set to all,
and then they equal a fresh run at those criteria. Every run, sweep and comparison writes a
self-contained report.html; tests/test_browser.py renders them in Chromium."""

import csv
import json
import os
import re
import statistics as st
import subprocess
import sys

import pytest
from conftest import REPO, make_cfg, tiny_overrides

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.pipeline import run
from outlier_hydra.tools.compare import compare


@pytest.fixture(scope="module")
def four_runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("four_runs")
    runs = {f: root / f for f in ("olmoe", "qwen3_moe", "mixtral")}
    for family, out in runs.items():
        run(make_cfg(*tiny_overrides(tiny_models[family], "analysis.stages.massive_activations.enabled=true")), out)
    runs["minilm"] = root / "minilm"
    run(make_cfg("dataset.num_sequences=4", "dataset.sequence_length=64"), runs["minilm"])
    return runs


def _causal_lm_params(model_dir):
    """Independent: the parameters of the checkpoint's causal-LM class, as transformers builds it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())


def _results(path):
    return json.loads((path / "final_analysis_results.json").read_text())


def test_compare_numbers_equal_the_runs_own_json(four_runs, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", "compare", *map(str, four_runs.values()), "--out", str(tmp_path / "cmp")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "models" not in proc.stderr
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    rows = {row["run"]: row for row in doc["runs"]}
    assert list(rows) == [str(p) for p in four_runs.values()]
    for name, path in four_runs.items():
        r, row = _results(path), rows[str(path)]
        feats = r["systematic_outliers"]
        assert row["systematic_dims"] == r["num_systematic_outliers"] == len(feats)
        assert (row["tokens"], row["hooked_modules"]) == (r["num_tokens"], r["num_hooked_modules"])
        assert row["model_type"] == r["model"]["model_type"]
        assert row["mean_layer_pct"] == pytest.approx(st.mean(100 * f["layer_percentage"] for f in feats))
        assert row["median_seq_pct"] == pytest.approx(st.median(100 * f["seq_percentage"] for f in feats))
        assert row["max_magnitude"] == max(f["max_magnitude"] for f in feats)
        assert [int(t.split()[0]) for t in row["top_dims"]] == [f["feature_dim"] for f in feats[:5]]
        if name == "minilm":
            assert row["kind"] == "dense" and row["router_top_expert_share"] is None and row["massive_activations"] is None
            assert row["super_experts"] is None  # the experts stage is off for dense models
            assert row["total_params"] == row["active_params"] == _causal_lm_params(r["model"]["name"])
        else:
            assert row["kind"] == "MoE" and row["total_params"] > row["active_params"]
            tops = [f["top_experts_all_layers"] for f in r["moe_routing"]["features"]]
            shares = [t[0]["share"] for t in tops if t]
            assert row["router_top_expert_share"] == pytest.approx(st.mean(shares))
            assert row["massive_activations"] == sum(len(e["massive"]) for e in r["massive_activations"]["layers"])
            named = [tuple(map(int, re.fullmatch(r"L(\d+) E(\d+) \(.*\)", x).groups())) for x in row["super_experts"]]
            assert named == [(s["layer"], s["expert"]) for s in r["experts"]["super_experts"]] and named
    assert not any("different numbers of tokens" in n for n in doc["notes"])  # all four cover 256 tokens here
    with open(tmp_path / "cmp" / "comparison.csv") as f:
        assert [row["systematic_dims"] for row in csv.DictReader(f)] == [
            str(rows[str(p)]["systematic_dims"]) for p in four_runs.values()
        ]
    for plot in ("systematic_vs_threshold", "depth_profile", "layer_vs_seq"):
        assert (tmp_path / "cmp" / f"{plot}.png").stat().st_size > 5_000
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("<tr>") == 1 + 4 and "http" not in re.sub(r'href="[^"]*"', "", page).replace("http-equiv", "")
    assert "| model" in proc.stdout or "model" in proc.stdout


def test_runs_at_other_criteria_are_refused_unless_reanalysed(four_runs, tiny_models, tmp_path):
    other = tmp_path / "olmoe_t4"
    run(make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.magnitude_threshold=4")), other)
    with pytest.raises(OutlierHydraError, match=r"olmoe_t4: analysed at other criteria .* add --reanalyze"):
        compare([four_runs["olmoe"], other], tmp_path / "cmp")
    doc = compare([four_runs["olmoe"], other], tmp_path / "cmp", reanalyze=True, overrides={"magnitude_threshold": 8.0})
    fresh = run(make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.magnitude_threshold=8")), tmp_path / "fresh8")
    assert doc["criteria"]["magnitude_threshold"] == 8.0 and doc["reanalysed"]
    for row in doc["runs"]:
        assert row["systematic_dims"] == fresh["num_systematic_outliers"]
        assert row["max_magnitude"] == max(f["max_magnitude"] for f in fresh["systematic_outliers"])


def test_a_sweep_directory_stands_for_its_runs_and_token_counts_may_differ(four_runs, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for i, name in enumerate(("olmoe", "minilm")):
        os.symlink(four_runs[name], sweep / str(i))
    bigger = tmp_path / "minilm_big"
    run(make_cfg("dataset.num_sequences=8", "dataset.sequence_length=64"), bigger)
    doc = compare([sweep, bigger], tmp_path / "cmp")
    assert [r["run"] for r in doc["runs"]] == [str(sweep / "0"), str(sweep / "1"), str(bigger)]
    assert any("different numbers of tokens (256, 512)" in n for n in doc["notes"])


def test_every_run_and_sweep_writes_a_self_contained_report(four_runs):
    for path in four_runs.values():
        page = (path / "report.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "<script src" not in page and '<link rel="stylesheet"' not in page
        assert page.count('src="data:image/png;base64,') == len(list((path / "plots").glob("*.png")))
        assert f"{_results(path)['num_systematic_outliers']} systematic outlier features" in page
    assert "moe_routing" in (four_runs["olmoe"] / "report.html").read_text()
