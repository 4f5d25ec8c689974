"""Re-apply the criteria to a finished run's statistics, without the model, in seconds.

    outlier-hydra reanalyze RUN_DIR analysis.magnitude_threshold=4 analysis.min_seq_percentage=0.1 [--out DIR]

Only analysis-only keys may change: analysis.magnitude_threshold (any histogram edge of the run:
by default 3,4,5,6,7,8,10,12,16,20,32,64,100,1000 and the run's own threshold),
analysis.min_layer_percentage, analysis.min_seq_percentage, and analysis.num_examples up to the
run's, and a stage's report-only settings (`Stage.report_only`, e.g.
analysis.stages.experts.super_percentile and super_fraction). The values are typed by the schema, as
on the run's command line. The result files (final and
per batch) are identical to those of a fresh run at those settings ("post" stages such as int8_error
need the model and are left out); a threshold that is not an edge is refused with the edges there are.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from outlier_hydra.analysis import build_documents
from outlier_hydra.config.validate import check_config
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.output.report import run_report
from outlier_hydra.pipeline import rundir
from outlier_hydra.stages import build_stages
from outlier_hydra.stats import ThresholdNotAnEdge
from outlier_hydra.tools.args import settings
from outlier_hydra.tools.saved_run import load_run, report_context

ANALYSIS_ONLY = ("magnitude_threshold", "min_layer_percentage", "min_seq_percentage", "num_examples")


def reanalyze(run_dir: Path, overrides: list[str], out: Path | None = None) -> tuple[dict, Path]:
    """overrides: Hydra-style `analysis.KEY=VALUE` for the analysis-only keys, and allowed_targets."""
    given = settings(overrides)
    allowed = list(given.pop("allowed_targets", []))

    def refuse(key: str, stage_keys: list[str]):
        keys = [f"analysis.{k}" for k in ANALYSIS_ONLY] + stage_keys
        return OutlierHydraError(f"{key}: reanalysis changes only {', '.join(keys)}; anything else needs a new run")

    for key in given:  # before reading the run: anything but these keys is refused outright
        analysis_only = key.startswith("analysis.") and key.removeprefix("analysis.") in ANALYSIS_ONLY
        if not analysis_only and not key.startswith("analysis.stages."):
            raise refuse(key, [])
    run = load_run(Path(run_dir), list(allowed))
    report_only = {f"analysis.stages.{s.name}.{k}" for s in run.stages for k in s.report_only}
    for key in given:
        if key.startswith("analysis.stages.") and key not in report_only:
            raise refuse(key, sorted(report_only))
    new_values = {k.removeprefix("analysis."): v for k, v in given.items() if k not in report_only}
    stage_settings: dict[str, dict] = {}
    for key in (k for k in given if k in report_only):
        name, setting = key.removeprefix("analysis.stages.").split(".", 1)
        stage_settings.setdefault(name, {})[setting] = given[key]
    cfg = run.config_with(new_values, stage_settings)  # types the new values
    stages = build_stages(cfg.analysis.stages, list(allowed))
    check_config(cfg)
    kept = run.config["analysis"]["num_examples"]
    if cfg.analysis.num_examples > kept:
        raise OutlierHydraError(f"analysis.num_examples: the run kept {kept}")
    analyzer = run.analyzer(cfg.analysis.analyzer)
    try:
        for b in run.batches:
            b.edge_index(analyzer.magnitude_threshold)
    except ThresholdNotAnEdge as exc:
        raise OutlierHydraError(f"analysis.magnitude_threshold: {exc}") from None
    values = {k: cfg.analysis[k] for k in ANALYSIS_ONLY}
    tag = "_".join(
        [f"{k}={values[k]}" for k in ANALYSIS_ONLY[:3]]
        + [f"{k.removeprefix('analysis.stages.')}={v}" for k, v in given.items() if k in report_only]
    )
    out = Path(out) if out else Path(run_dir) / "reanalysis" / tag
    header = {k: run.results[k] for k in ("model", "dataset", "collector") if k in run.results}
    per_batch, results, total = build_documents(header, analyzer, run.batches, stages, **report_context(run))
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_documents(out, per_batch, results, total)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    rundir.write_json(out / rundir.CONFIG_JSON, plain)
    run_report(out, results, {}, stages)
    return results, out


def command(paths: list[Path], overrides: list[str], out: Path | None) -> str:
    if len(paths) != 1:
        raise OutlierHydraError("reanalyze: give one run directory")
    results, where = reanalyze(paths[0], overrides, out)
    return f"{results['num_systematic_outliers']} systematic features -> {where / rundir.FINAL_RESULTS}"
