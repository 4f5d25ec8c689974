"""What a run does, decided before any weight loads: the Plan, and the model loaded only when needed.

prepare(cfg) makes every check (checks.py) and reads what the run needs in this order, so that bad
input ends before anything heavy: the settings; the stages' settings; the checkpoint's config.json
(with discovery on the meta device) read once into ModelFacts; the model checks; the tokenizer and
the token windows; the collector and analyzer built from their `_target_` nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from outlier_hydra.collect.host_memory import retain_freed_memory
from outlier_hydra.config.targets import instantiate_node
from outlier_hydra.data import sequence_range, token_windows
from outlier_hydra.models import ModelFacts, load_model, load_tokenizer, probe, read_facts
from outlier_hydra.models.loading import input_device
from outlier_hydra.models.types import HookPoint, Structure
from outlier_hydra.pipeline import cache
from outlier_hydra.pipeline.checks import check_against, check_settings
from outlier_hydra.stages import StageSet, build_stages

log = logging.getLogger(__name__)


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


@dataclass
class Plan:
    cfg: DictConfig
    plain: dict
    facts: ModelFacts  # the checkpoint's config and the structure discovery found (the probe completes it)
    layers: list[int]
    tokenizer: Any
    token_ids: np.ndarray
    first_sequence: int  # global index of token_ids[0]
    collector: Any
    analyzer: Any
    stages: StageSet  # the enabled stages that apply to this model
    stats_key: str  # what determines the statistics (cache.py): the same -> reusable batch files

    @property
    def structure(self) -> Structure:
        return self.facts.structure

    @property
    def points(self) -> list[HookPoint]:
        """The hook points (where each reads its input is known once the probe forward ran)."""
        return self.structure.hook_points(self.layers)

    def sequence_ids(self, device, sequences: list[int]) -> torch.Tensor:
        """The token ids of the given (global) sequence indices, on the device."""
        rows = [s - self.first_sequence for s in sequences]
        return torch.from_numpy(self.token_ids[rows]).to(device)

    def batch_ids(self, device, limit: int | None = None) -> list[torch.Tensor]:
        bs = self.cfg.analysis.batch_size
        starts = range(0, len(self.token_ids), bs)
        return [torch.from_numpy(self.token_ids[s : s + bs]).to(device) for s in list(starts)[:limit]]


def prepare(cfg: DictConfig) -> Plan:
    check_settings(cfg)
    allowed = list(cfg.allowed_targets)
    stages = build_stages(cfg.analysis.stages, allowed)
    facts = read_facts(cfg.model)
    layers = check_against(cfg, facts)
    tokenizer = load_tokenizer(cfg.model)
    token_ids = token_windows(cfg.dataset, tokenizer)
    collector = instantiate_node(cfg.analysis.collector, "analysis.collector", allowed)
    analyzer = instantiate_node(cfg.analysis.analyzer, "analysis.analyzer", allowed)
    plain = plain_config(cfg)
    stages = stages.bound(facts.structure, layers)
    edges = getattr(collector, "edges", None)
    target = cfg.analysis.collector._target_
    stats_key = cache.cache_key(plain, edges if edges is not None else [], target, stages.collecting)
    return Plan(
        cfg=cfg,
        plain=plain,
        facts=facts,
        layers=layers,
        tokenizer=tokenizer,
        token_ids=token_ids,
        first_sequence=sequence_range(cfg.dataset)[0],
        collector=collector,
        analyzer=analyzer,
        stages=stages,
        stats_key=stats_key,
    )


class LazyModel:
    """Loads the weights the first time something needs them, and never otherwise; the probe forward
    then checks and completes the plan's structure."""

    def __init__(self, cfg: DictConfig, facts: ModelFacts):
        self.cfg, self.facts = cfg, facts
        self.model: torch.nn.Module | None = None
        self.device: torch.device | None = None

    def get(self) -> tuple[torch.nn.Module, torch.device]:
        if self.model is None:
            log.info("loading %s (%s, device_map=%s)", self.cfg.model.name, self.facts.model_type, self.cfg.model.device_map)
            if not self.cfg.progress:  # progress=false: no progress bar of transformers' either
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            self.model = load_model(self.cfg.model)
            self.device = ready(self.cfg, self.facts, self.model)
        assert self.device is not None
        return self.model, self.device


def ready(cfg: DictConfig, facts: ModelFacts, model: torch.nn.Module) -> torch.device:
    """A model just loaded (or built) made ready for the hooks: freed host memory kept on a CPU run
    (retain_host_memory), and the probe forward checking and completing the structure. Returns the
    input device."""
    device = input_device(model)
    if device.type == "cpu" and cfg.retain_host_memory:
        retain_freed_memory()
    probe(facts.structure, model, device, facts.name, facts.top_k)
    return device
