"""W&B, offline: the run directory holds the feature table that final_analysis_results.json holds."""

import json

import pytest
from conftest import make_cfg, tiny_overrides

from outlier_hydra.output.loggers.wandb_logger import FEATURE_COLUMNS
from outlier_hydra.pipeline import run


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _run_dir(out):
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    return runs[0]


def test_offline_run_logs_the_feature_table(tiny_models, tmp_path, wandb_env):
    out = tmp_path / "run"
    results = run(make_cfg(*tiny_overrides(tiny_models["qwen3_moe"]), "logger=wandb", "logger.mode=offline"), out)
    files = _run_dir(out) / "files"
    # report.html, logged as an artifact of the run (recorded in the offline run's log)
    log = next(_run_dir(out).glob("run-*.wandb")).read_bytes()
    assert b"report.html" in log and b"report-oh-" in log
    table = json.loads(next((files / "media" / "table").glob("systematic_outliers_*.table.json")).read_text())
    assert table["columns"] == FEATURE_COLUMNS
    logged = {row[0]: row for row in table["data"]}
    assert set(logged) == {r["feature_dim"] for r in results["systematic_outliers"]} == {7, 21}
    for r in results["systematic_outliers"]:
        row = dict(zip(FEATURE_COLUMNS, logged[r["feature_dim"]]))
        assert row["max_magnitude"] == pytest.approx(r["max_magnitude"])
        assert row["seq_percentage"] == r["seq_percentage"] and row["layer_percentage"] == r["layer_percentage"]
        assert row["total_occurrences"] == r["total_occurrences"]
    modules = json.loads(next((files / "media" / "table").glob("per_module_outliers_*.table.json")).read_text())
    assert [m[0] for m in modules["data"]] == results["hooked_modules"]
    logged_plots = {p.name.rsplit("_", 2)[0] for p in (files / "media" / "images" / "plots").glob("*.png")}
    assert (
        logged_plots == {p.stem for p in (out / "plots").glob("*.png")} >= {"outlier_heatmap", "criteria", "moe_expert_load"}
    )
    routing = json.loads(
        next((files / "media" / "table" / "moe_routing").glob("feature_top_expert_*.table.json")).read_text()
    )
    assert {row[0] for row in routing["data"]} == {7, 21} & {
        f["feature_dim"] for f in results["moe_routing"]["features"] if f["layers"]
    }


def test_failed_job_still_finishes_its_run(tiny_models, tmp_path, wandb_env, monkeypatch):
    import outlier_hydra.pipeline.job as run_module

    def boom(*a, **k):
        raise RuntimeError("simulated crash in the middle of the job")

    monkeypatch.setattr(run_module.rundir, "write_documents", boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_cfg(*tiny_overrides(tiny_models["olmoe"]), "logger=wandb", "logger.mode=offline"), out)
    log = (_run_dir(out) / "logs" / "debug.log").read_text()
    assert "finishing run" in log and "got exitcode: 1" in log
    import wandb

    assert wandb.run is None, "the run was finished, not left open"


def test_requeued_job_resumes_the_same_run_id(tmp_path):
    from omegaconf import OmegaConf

    from outlier_hydra.output.loggers.wandb_logger import run_id

    cfg = OmegaConf.create({"id": None})
    assert run_id(cfg, tmp_path / "a") == run_id(cfg, tmp_path / "a") != run_id(cfg, tmp_path / "b")
    assert run_id(OmegaConf.create({"id": "mine"}), tmp_path / "a") == "mine"


def test_a_rerun_in_the_same_directory_resumes_the_same_wandb_run(tiny_models, tmp_path, wandb_env, monkeypatch):
    """A requeued job reruns in its directory: the same run id, opened with resume="allow" (W&B then
    appends to that run instead of starting a second one), end to end in offline mode."""
    import wandb

    calls = []
    real_init = wandb.init

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    out = tmp_path / "run"
    cfg = make_cfg(*tiny_overrides(tiny_models["olmoe"], "dataset.num_sequences=4"), "logger=wandb", "logger.mode=offline")
    first = run(cfg, out)
    second = run(cfg, out)
    assert first == second
    assert [c["id"] for c in calls] == [calls[0]["id"]] * 2 and calls[0]["id"].startswith("oh-")
    assert all(c["resume"] == "allow" for c in calls)
    # one offline folder per start (W&B adds -1 to a second start within the same second), all of that id
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert offline and all(f"-{calls[0]['id']}" in p.name for p in offline)  # -1 added within one second
