"""Test doubles that plug into the real pipeline as a user's own code would: named by `_target_`
on the command line (with allowed_targets=[doubles.]), or driving the real collector."""

from __future__ import annotations

import time

import torch

from outlier_hydra.analysis import SystematicOutlierAnalysis
from outlier_hydra.collect import OutlierCollector
from outlier_hydra.models import discover, probe
from outlier_hydra.models.configs import config_top_k
from outlier_hydra.models.types import HookPoint


class TopFeatureOnly(SystematicOutlierAnalysis):
    """A user's own analysis stage, swapped in from the command line in a test."""

    def records(self, stats):
        return super().records(stats)[:1]


class SlowCollector(OutlierCollector):
    """Takes a while per batch, so that a test can kill a run between batches."""

    def collect_batch(self, *args, **kwargs):
        time.sleep(0.4)
        return super().collect_batch(*args, **kwargs)


class ReplayModel(torch.nn.Module):
    """A stand-in decoder whose hook points output chosen activations: acts[layer][kind] is a
    [batch, tokens, D] tensor per batch (kind 0 = ln_attn, 1 = ln_mlp). Lets tests feed exact
    values (NaN, Inf, exactly 6.0, bf16) through the real collector."""

    def __init__(self, acts: list[list[torch.Tensor]]):
        super().__init__()
        self.acts = acts
        self.layers = torch.nn.ModuleList()
        for _ in acts:
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Identity()
            layer.mlp = torch.nn.Identity()
            self.layers.append(layer)

    def forward(self, input_ids):
        for layer, (attn, mlp) in zip(self.layers, self.acts):
            layer.self_attn(attn)
            layer.mlp(mlp)

    @staticmethod
    def points(layers):
        """The hook points of the replayed layers: the inputs of self_attn and mlp."""
        out = []
        for i in layers:
            out += [
                HookPoint(f"layer_{i}_ln_attn", i, f"layers.{i}.self_attn"),
                HookPoint(f"layer_{i}_ln_mlp", i, f"layers.{i}.mlp"),
            ]
        return out


def structure_points(model, layers):
    """Hook points of a real model, found by the project's discovery and probe."""
    structure = discover(model, len(model.layers), model.config.hidden_size, None, "test")
    probe(structure, model, next(model.parameters()).device, "test", config_top_k(model.config))
    return structure.hook_points(layers)


class OomInForward(OutlierCollector):
    """Raises torch's out-of-memory error from inside the forward pass (a pre-hook on layer 1) on
    the N-th batch this process collects, N from $OH_TEST_OOM_AT_BATCH; otherwise the real collector."""

    calls = 0

    def collect_batch(self, model, *args, **kwargs):
        import os

        type(self).calls += 1
        if str(type(self).calls) != os.environ.get("OH_TEST_OOM_AT_BATCH"):
            return super().collect_batch(model, *args, **kwargs)

        def allocate(module, args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated by the test)")

        handle = model.layers[1].register_forward_pre_hook(allocate)
        try:
            return super().collect_batch(model, *args, **kwargs)
        finally:
            handle.remove()
