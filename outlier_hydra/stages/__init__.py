"""Optional stages that ride on the same forward passes as the outlier collection (or, for int8,
re-run a batch once the systematic features are known). Each is a `_target_` in the analysis config
with an `enabled` switch:

  analysis.router    (on)   router/expert statistics of MoE layers, overall and at outlier positions
  analysis.massive   (off)  massive activations in the residual stream (Sun et al. 2024)
  analysis.int8      (off)  per-token absmax int8 error of each hooked input, all dims vs outliers kept

A collection stage gives forward hooks for the layers of a pass (`hooks(layers)`), keeps its running
state on the model's device, and turns it into a small mergeable object at the end of a batch
(`finish_batch()`), which OutlierStats carries in `extras`. `report(...)` turns merged statistics
into the JSON that lands under the stage's key in the result files.
"""

from __future__ import annotations

from typing import Callable, Protocol

Hook = Callable  # forward hook: (module, args, output) -> None


class CollectionStage(Protocol):
    name: str

    def bind(self, adapter, layers: list[int], threshold: float) -> bool:
        """Prepare for this model; False if the stage does not apply (e.g. no MoE router)."""

    def hooks(self, layers: list[int]) -> list[tuple[str, Hook]]:
        """(module path, forward hook) for the given layers of one forward pass."""

    def stop_after(self, layer: int) -> tuple[int, str]:
        """(rank, module path): how far into the pass's last layer the forward must run
        (0: its MLP input, 1: its router, 2: its output)."""

    def start_batch(self, first_sequence: int) -> None: ...

    def finish_batch(self): ...

    def report(self, stats, records: list[dict], tokenizer=None) -> dict: ...


def build_stages(analysis_cfg) -> list:
    """The enabled collection stages (router, massive), instantiated from their `_target_` nodes."""
    stages = []
    for key in ("router", "massive"):
        node = analysis_cfg.get(key)
        if node is not None and node.enabled:
            stages.append(instantiate_stage(node))
    return stages


def instantiate_stage(node):
    """hydra.utils.instantiate of a stage node, without its `enabled` switch."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "enabled"}
    return instantiate(kwargs)


def stages_for_report(analysis: dict, stats) -> list:
    """The stages whose statistics a finished run holds, rebuilt from its config.json (to report
    them again: reanalysis, merging)."""
    from omegaconf import OmegaConf

    return [s for s in build_stages(OmegaConf.create(analysis)) if s.name in stats.extras]


def report_context(run_dir, config: dict, results: dict) -> dict:
    """tokenizer, token ids and first sequence of a finished run, for stage reports."""
    from pathlib import Path

    import numpy as np
    from omegaconf import OmegaConf

    from outlier_hydra.models.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(OmegaConf.create(config["model"]))
    except Exception:  # noqa: BLE001 - decoded tokens are a nicety; ids are still reported
        tokenizer = None
    return {"tokenizer": tokenizer, "token_ids": np.load(Path(run_dir) / "token_ids.npy"),
            "first_sequence": results["dataset"]["skip_sequences"]}
