"""Reading a finished run directory as data: its config validated against the schema, its stages
rebuilt from the registry, its statistics loaded only for those stages.

A run directory may come from someone else. Nothing in it decides what is imported or called:
``allowed_targets`` comes from the command line of the command that reads it (never from the saved
config), every `_target_` in the saved config is checked against it, and a statistics file that
names a stage the config does not configure is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from outlier_hydra.config.schema import Config
from outlier_hydra.config.targets import instantiate_node
from outlier_hydra.errors import OutlierHydraError, first_line
from outlier_hydra.pipeline import rundir
from outlier_hydra.stages import StageSet, build_stages
from outlier_hydra.stats import OutlierStats


@dataclass
class SavedRun:
    path: Path
    config: dict  # config.json as saved (plain)
    cfg: DictConfig  # the same, typed by the schema, allowed_targets from the command line
    results: dict
    stages: StageSet
    batches: list[OutlierStats]

    def config_with(self, analysis: dict, stages: dict[str, dict] | None = None) -> DictConfig:
        """The run's config with other analysis-only values (analysis.KEY: value; the analyzer node,
        saved resolved, gets them too) and stage settings ({stage: {setting: value}}), typed by the
        schema: a wrong type is one line naming the key."""
        saved = self.config["analysis"]
        nodes = {name: dict(node) if node else node for name, node in saved["stages"].items()}
        for name, settings in (stages or {}).items():
            nodes[name] = {**nodes[name], **settings}
        changed = {
            **self.config,
            "analysis": {**saved, **analysis, "analyzer": {**saved["analyzer"], **analysis}, "stages": nodes},
        }
        return typed_config(changed, list(self.cfg.allowed_targets), self.path / rundir.CONFIG_JSON)

    def analyzer(self, node: DictConfig | None = None):
        return instantiate_node(
            node if node is not None else self.cfg.analysis.analyzer, "analysis.analyzer", list(self.cfg.allowed_targets)
        )


def typed_config(plain: dict, allowed: list[str], where: Path) -> DictConfig:
    """A saved config through the schema (a wrong type or unknown key: one line naming the file)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), {**plain, "allowed_targets": list(allowed)})
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "")
        raise OutlierHydraError(f"{where}: {key + ': ' if key else ''}{first_line(exc)}") from None
    assert isinstance(cfg, DictConfig)
    return cfg


def load_run(run_dir: Path, allowed: list[str]) -> SavedRun:
    run_dir = Path(run_dir)
    final = run_dir / rundir.FINAL_RESULTS
    if not final.is_file():
        raise OutlierHydraError(f"{run_dir}: no {rundir.FINAL_RESULTS} (the run did not finish)")
    config = rundir.read_json(run_dir / rundir.CONFIG_JSON)
    cfg = typed_config(config, allowed, run_dir / rundir.CONFIG_JSON)
    stages = build_stages(cfg.analysis.stages, list(allowed))
    results = rundir.read_json(final)
    batches = rundir.load_batches(run_dir, stages.stats_classes)
    if len(batches) != results["num_batches"]:
        raise OutlierHydraError(f"{run_dir}: {len(batches)} batch statistics for {results['num_batches']} batches")
    return SavedRun(run_dir, config, cfg, results, stages, batches)


def report_context(run: SavedRun) -> dict:
    """tokenizer, token ids and first sequence of a finished run, for stage reports."""
    import numpy as np

    from outlier_hydra.models.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(run.cfg.model)
    except Exception:  # noqa: BLE001 - decoded tokens are a nicety; ids are still reported
        tokenizer = None
    return {
        "tokenizer": tokenizer,
        "token_ids": np.load(run.path / rundir.TOKEN_IDS),
        "first_sequence": run.results["dataset"]["skip_sequences"],
    }
