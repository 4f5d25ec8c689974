"""Test doubles that plug into the real pipeline as a user's own code would: named by `_target_`
on the command line (with allowed_targets=[doubles.]), or driving the real collector."""

from __future__ import annotations

import time

import torch

from outlier_hydra.analysis import SystematicOutlierAnalysis
from outlier_hydra.collect import OutlierCollector


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
            layer.input_layernorm = torch.nn.Identity()
            layer.post_attention_layernorm = torch.nn.Identity()
            self.layers.append(layer)

    def forward(self, input_ids):
        for layer, (attn, mlp) in zip(self.layers, self.acts):
            layer.input_layernorm(attn)
            layer.post_attention_layernorm(mlp)


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
