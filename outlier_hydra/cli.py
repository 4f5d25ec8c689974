"""The one command line: ``outlier-hydra [SUBCOMMAND] [ARGS]`` (``python -m outlier_hydra`` is the same).

    outlier-hydra [run] [overrides]                      the job (Hydra app; -m for sweeps)
    outlier-hydra benchmark benchmark=cpu_mid [overrides]   collection cost vs the bare forward (Hydra app)
    outlier-hydra merge RUN_DIR... --out DIR             shards -> one result
    outlier-hydra reanalyze RUN_DIR analysis.KEY=VALUE... [--out DIR]   other criteria, no model
    outlier-hydra sweep-summary SWEEP_DIR                 the table and plot of a sweep
    outlier-hydra estimate-vram [overrides]              GPU memory of a configured run
    outlier-hydra compare RUN_OR_SWEEP_DIR... [--out DIR] [--reanalyze [analysis.KEY=VALUE...]]   runs side by side

Every subcommand takes Hydra-style ``key=value`` overrides, typed by the same schema; the commands
that read run directories take ``allowed_targets=[my_pkg.]`` from their own command line only.
Bad input ends with one line on stderr and exit code 2 (a traceback only with debug=true in a run).
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from outlier_hydra.config import config_dir
from outlier_hydra.errors import OutlierHydraError, one_line
from outlier_hydra.registration import register

EXIT_BAD_INPUT = 2
TOOLS = {
    "merge": "outlier_hydra.tools.merge",
    "reanalyze": "outlier_hydra.tools.reanalyze",
    "sweep-summary": "outlier_hydra.tools.sweep_summary",
    "estimate-vram": "outlier_hydra.tools.estimate_vram",
    "compare": "outlier_hydra.tools.compare",
}
FLAGS = {"compare": {"--reanalyze"}}  # the options a tool takes besides --out
APPS = ("run", "benchmark")


def run_or_exit(cfg: DictConfig) -> int:
    """Run the job; returns the number of systematic features (a sweeper can optimise on it)."""
    from outlier_hydra.pipeline import run

    try:
        return run(cfg)["num_systematic_outliers"]
    except OutlierHydraError as exc:
        if cfg.get("debug"):
            raise
        print(f"outlier_hydra: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def run_app(cfg: DictConfig) -> int:
    register()  # a submitit job starts here, in a fresh interpreter
    # a log file on a full disk must not print tracebacks over the one-line error (logging's own advice)
    logging.raiseExceptions = False
    return run_or_exit(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def benchmark_app(cfg: DictConfig) -> float:
    register()
    from hydra.core.hydra_config import HydraConfig

    from outlier_hydra.tools.benchmark import run_benchmark

    if cfg.get("benchmark") is None:
        presets = " | ".join(sorted(p.stem for p in (Path(config_dir()) / "benchmark").glob("*.yaml")))
        print(f"outlier-hydra benchmark: error: choose a preset: benchmark={presets}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return run_benchmark(cfg, Path(HydraConfig.get().runtime.output_dir))["ratio_collect_over_forward"]


def run_tool(name: str, args: list[str]) -> int:
    from outlier_hydra.tools.args import split_args

    module = importlib.import_module(TOOLS[name])
    try:
        paths, overrides, out, flags = split_args(args, FLAGS.get(name, set()))
        print(module.command(paths, overrides, out, flags) if flags else module.command(paths, overrides, out))
    except OutlierHydraError as exc:
        print(f"outlier-hydra {name}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command = args[0] if args and (args[0] in TOOLS or args[0] in APPS or args[0] == "help") else "run"
    rest = args[1:] if args and args[0] == command else args
    if command == "help":
        print(__doc__)
        return 0
    if command in TOOLS:
        register()
        return run_tool(command, rest)
    register()
    sys.argv = [sys.argv[0], *rest]
    (benchmark_app if command == "benchmark" else run_app)()
    return 0
