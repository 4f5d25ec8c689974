"""The Stage protocol: what a stage is, what it is given, and how far into a pass it reads.

A stage is a subclass of :class:`Stage` in a module (or package) of outlier_hydra/stages/ plus its YAML
file ``conf/analysis/stages/<name>.yaml``, listed in ``conf/analysis/default.yaml``. Its ``name`` is
its registered name, its config key (``analysis.stages.<name>``), the key of its section in the result
files and of its statistics in the ``.npz`` files. Everything else that concerns it is a method:

  Config          typed settings (a dataclass; ``enabled`` switches the stage)
  Stats           its mergeable statistics (merge, to_arrays, from_arrays; ArrayStats gives the last two)
  phase           COLLECT: hooks on the same forward passes as the outlier statistics
                  POST: runs once the systematic features are known (passes of its own)
  bind            whether it applies to this model (e.g. MoE only), and which layers it reads
  hooks / stop_after / prepare / start_batch / end_pass / finish_batch   the device side of a COLLECT stage
  measure         what a POST stage computes (it gets the model on demand)
  cache_key       what determines its statistics (statistics reuse across a sweep)
  report          its JSON section, from merged statistics
  plots / rows / summary        PNG files, tables (report.html and W&B) and summary lines from its section

Which stages run, and in which phase, is the registry's job (registry.py: StageSet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from outlier_hydra.collect.hooks import Hook, Reach

COLLECT, POST = "collect", "post"
__all__ = ["COLLECT", "POST", "ArrayStats", "Hook", "PostContext", "Reach", "ReportContext", "Stage", "StageConfig", "plain"]


@dataclass
class StageConfig:
    enabled: bool = True


class ArrayStats:
    """For a stage's statistics dataclass whose every field is an array: saved field by field, read
    back as arrays (to_arrays / from_arrays of the Stats protocol); the subclass writes merge()."""

    def to_arrays(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_arrays(cls, arrays: dict):
        return cls(**{k: np.asarray(v) for k, v in arrays.items()})


@dataclass
class ReportContext:
    """What a stage's report may read besides its statistics."""

    records: list[dict]  # the systematic features of the document being written
    tokenizer: Any = None
    token_ids: Any = None  # the run's token ids [sequences, length] (None: not available)
    first_sequence: int = 0  # global index of token_ids[0]
    extras: dict = field(default_factory=dict)  # every collect stage's statistics for the same document


@dataclass
class PostContext:
    """What a POST stage gets: the model on demand, the hook points and the run's batches."""

    model: Callable[[], tuple[Any, Any]]  # () -> (model, input device); loads the weights if needed
    points: Callable[[], list]  # () -> the hook points (call it after model())
    batches: Callable[[Any, int], list]  # (device, n) -> the run's first n batches of token ids there
    results: dict  # the final document so far
    structure: Any = None  # models.types.Structure (where the routers and experts are)
    sequences: Callable[[Any, list[int]], Any] | None = None  # (device, global sequence indices) -> token ids


class Stage:
    name: ClassVar[str]
    Config: ClassVar[type] = StageConfig
    Stats: ClassVar[type | None] = None
    phase: ClassVar[str] = COLLECT
    report_only: ClassVar[tuple[str, ...]] = ()  # settings read only by report(): reanalyze may change them

    def __init__(self, config: Any):
        self.config = config

    # ---- every stage ---------------------------------------------------------------------------
    def bind(self, structure, layers: list[int]) -> bool:
        """Prepare for this model (its models.types.Structure); False if the stage does not apply."""
        self.structure, self.layers = structure, sorted(layers)
        return True

    def cache_key(self) -> dict:
        """Everything that changes what this stage collects (default: its settings but report_only)."""
        return {k: v for k, v in plain(self.config).items() if k not in self.report_only}

    def report(self, stats: Any, ctx: ReportContext) -> dict:
        raise NotImplementedError

    def plots(self, section: dict, folder: Path) -> dict[str, Path]:
        return {}

    def rows(self, section: dict) -> dict[str, tuple[list[str], list[list]]]:
        """Tables of its section, title -> (columns, rows): report.html shows them, W&B logs them."""
        return {}

    def tables(self, section: dict, wandb) -> dict:
        """What W&B logs for it (default: rows() as wandb.Table under "<name>/<title>")."""
        return {
            f"{self.name}/{title}": wandb.Table(columns=cols, data=data)
            for title, (cols, data) in self.rows(section).items()
        }

    def summary(self, section: dict) -> list[str]:
        return []

    # ---- COLLECT stages ------------------------------------------------------------------------
    def hooks(self, layers: list[int]) -> list[tuple]:
        """(module path, forward hook) or (module path, pre-hook, "pre") pairs (collect/hooks.py)."""
        return []

    def stop_after(self, layer: int) -> tuple | None:
        """(Reach, module path[, "pre"]) the forward must reach in a pass's last layer, or None if the
        stage reads nothing past the last hook point."""
        return None

    def prepare(self, model: Any, input_ids: Any) -> None:
        """Before each pass: the model being run and the batch's token ids (most stages need neither)."""

    def start_batch(self, first_sequence: int) -> None:
        pass

    def end_pass(self) -> None:
        """After each pass, also one stopped early or failed: release anything held across hooks."""

    def finish_batch(self) -> Any:
        raise NotImplementedError

    # ---- POST stages ---------------------------------------------------------------------------
    def measure(self, ctx: PostContext) -> dict:
        raise NotImplementedError


def plain(config: Any) -> dict:
    """A stage config (DictConfig or dataclass) as a plain dict without the `enabled` switch."""
    from dataclasses import asdict, is_dataclass

    from omegaconf import DictConfig, OmegaConf

    d: Any
    if isinstance(config, DictConfig):
        d = OmegaConf.to_container(config, resolve=True)
    elif is_dataclass(config) and not isinstance(config, type):
        d = asdict(config)
    else:
        d = dict(config)
    return {k: v for k, v in d.items() if k not in ("enabled", "_target_")}
