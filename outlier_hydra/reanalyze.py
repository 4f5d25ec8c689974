"""Re-apply the criteria to a finished run's statistics, without the model, in seconds.

    python -m outlier_hydra.reanalyze RUN_DIR analysis.magnitude_threshold=4 analysis.min_seq_percentage=0.1 [--out DIR]

Only analysis-only keys may change: analysis.magnitude_threshold (any histogram edge of the run:
by default 2,3,4,5,6,7,8,10,12,16,20,32,64,100,1000 and the run's own threshold),
analysis.min_layer_percentage, analysis.min_seq_percentage, and analysis.num_examples up to the
run's. The result files (final and per batch) are identical to those of a fresh run at those
settings; a threshold that is not an edge is refused with the edges there are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from outlier_hydra import report
from outlier_hydra.cli import exit_code_of
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.stats import ThresholdNotAnEdge

ANALYSIS_ONLY = ("magnitude_threshold", "min_layer_percentage", "min_seq_percentage", "num_examples")


def reanalyze(run_dir: Path, overrides: list[str], out: Path | None = None) -> tuple[dict, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / report.FINAL_RESULTS).is_file():
        raise OutlierHydraError(f"{run_dir}: no {report.FINAL_RESULTS} (not a finished run)")
    config = report.read_json(run_dir / report.CONFIG_JSON)
    old = report.read_json(run_dir / report.FINAL_RESULTS)
    analysis = dict(config["analysis"])
    for item in overrides:
        key, sep, value = item.partition("=")
        name = key.removeprefix("analysis.")
        if not sep or not key.startswith("analysis.") or name not in ANALYSIS_ONLY:
            raise OutlierHydraError(
                f"{key}: reanalysis changes only {', '.join('analysis.' + k for k in ANALYSIS_ONLY)}; "
                "anything else needs a new run"
            )
        analysis[name] = value
    from omegaconf.errors import ValidationError

    from outlier_hydra.validate import check_config

    try:  # the schema types the values, as Hydra would on its command line
        merged = OmegaConf.merge(OmegaConf.structured(_schema()), {**config, "analysis": analysis})
    except ValidationError as exc:
        raise OutlierHydraError(f"{exc.full_key}: {str(exc).splitlines()[0]}") from None
    check_config(merged)
    analysis.update({k: merged.analysis[k] for k in ANALYSIS_ONLY})
    if analysis["num_examples"] > config["analysis"]["num_examples"]:
        raise OutlierHydraError(f"analysis.num_examples: the run kept {config['analysis']['num_examples']}")
    node = {**config["analysis"]["analyzer"], **{k: analysis[k] for k in ANALYSIS_ONLY}}
    analyzer = instantiate(OmegaConf.create(node))
    batches = report.load_batches(run_dir)
    try:
        for b in batches:
            b.edge_index(analyzer.magnitude_threshold)
    except ThresholdNotAnEdge as exc:
        raise OutlierHydraError(f"analysis.magnitude_threshold: {exc}") from None
    tag = "_".join(f"{k}={analysis[k]}" for k in ANALYSIS_ONLY[:3])
    out = Path(out) if out else run_dir / "reanalysis" / tag
    out.mkdir(parents=True, exist_ok=True)
    header = {"model": old["model"], "dataset": old["dataset"]}
    from outlier_hydra.stages import report_context, stages_for_report

    stages = stages_for_report(config["analysis"], batches[0])
    results, _ = report.write_results(out, header, analyzer, batches, stages, **report_context(run_dir, config, old))
    report.write_json(out / report.CONFIG_JSON, {**config, "analysis": {**analysis, "analyzer": node}})
    return results, out


def _schema():
    from outlier_hydra.schema import Config

    return Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outlier_hydra.reanalyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="analysis.KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/reanalysis/<settings>")
    args = parser.parse_args(argv)

    def command():
        results, out = reanalyze(args.run_dir, args.overrides, args.out)
        print(f"{results['num_systematic_outliers']} systematic features -> {out / report.FINAL_RESULTS}")

    return exit_code_of("outlier_hydra.reanalyze", command)


if __name__ == "__main__":
    sys.exit(main())
