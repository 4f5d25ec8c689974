"""What the outliers cost in int8: the LLM.int8() decomposition, measured on the hooked inputs.

For each hooked module's input x [tokens, D] (in float32):
  all dims    q(x) = round(x / s_p) * s_p with s_p = max_d |x[p, d]| / 127 per token (absmax int8)
  kept        the systematic dims K stay in float16, the rest is quantized with the absmax of the
              rest only (so one outlier no longer sets every other value's step)
  relative error = ||x - x_hat||_F / ||x||_F, summed over tokens then rooted; reported per module
and over all modules. It runs after the analysis (it needs the systematic dims) on the first
`max_batches` batches of the run, one extra forward pass each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import MISSING

from outlier_hydra.collect.hooks import attached, on_input
from outlier_hydra.stages.protocol import POST, PostContext, Stage


def absmax_int8(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


def squared_errors(x: torch.Tensor, keep: list[int]) -> tuple[float, float, float]:
    """(error all dims quantized, error with `keep` in float16, ||x||^2), float64 sums."""
    x = x.float()
    err_all = ((x - absmax_int8(x)) ** 2).sum(dtype=torch.float64)
    rest = x.clone()
    if keep:
        rest[:, keep] = 0
    err_kept = ((rest - absmax_int8(rest)) ** 2).sum(dtype=torch.float64)
    if keep:
        kept = x[:, keep]
        err_kept = err_kept + ((kept - kept.half().float()) ** 2).sum(dtype=torch.float64)
    return float(err_all), float(err_kept), float((x.double() ** 2).sum())


@dataclass
class Int8ErrorConfig:
    """conf/analysis/stages/int8_error.yaml"""

    enabled: bool = MISSING
    max_batches: int = MISSING  # batches re-run (one extra forward each) once the systematic dims are known


class Int8Error(Stage):
    name = "int8_error"
    Config = Int8ErrorConfig
    phase = POST

    def __init__(self, config):
        super().__init__(config)
        self.max_batches = int(config.max_batches)

    @torch.inference_mode()
    def measure(self, ctx: PostContext) -> dict:
        model, device = ctx.model()
        keep_dims = sorted(r["feature_dim"] for r in ctx.results["systematic_outliers"])
        batches = ctx.batches(device, self.max_batches)
        points = ctx.points()
        sums = {p.name: np.zeros(3) for p in points}

        def hook(name):
            def fn(x):
                sums[name] += squared_errors(x.detach().reshape(-1, x.shape[-1]), keep_dims)

            return fn

        with attached(model, [on_input(p.module_path, p.at, hook(p.name)) for p in points]):
            for ids in batches:
                model(input_ids=ids)
        return self.errors(sums, keep_dims, sum(int(b.numel()) for b in batches))

    @staticmethod
    def errors(sums: dict, keep_dims: list[int], tokens: int) -> dict:
        def rel(err, norm):
            return float(np.sqrt(err / norm)) if norm else 0.0

        total = sum(sums.values())
        return {
            "kept_dims": list(keep_dims),
            "tokens": tokens,
            "relative_error_all_int8": rel(total[0], total[2]),
            "relative_error_outliers_kept": rel(total[1], total[2]),
            "modules": {
                name: {"relative_error_all_int8": rel(s[0], s[2]), "relative_error_outliers_kept": rel(s[1], s[2])}
                for name, s in sums.items()
            },
        }

    def rows(self, section: dict) -> dict[str, tuple[list[str], list[list]]]:
        rows = [
            [name, e["relative_error_all_int8"], e["relative_error_outliers_kept"]] for name, e in section["modules"].items()
        ]
        return {"modules": (["module", "relative_error_all_int8", "relative_error_outliers_kept"], rows)}

    def tables(self, section: dict, wandb) -> dict:
        return {
            **super().tables(section, wandb),
            "int8/relative_error_all_int8": section["relative_error_all_int8"],
            "int8/relative_error_outliers_kept": section["relative_error_outliers_kept"],
        }

    def summary(self, section: dict) -> list[str]:
        return [
            f"int8 relative error {section['relative_error_all_int8']:.4f}, with the {len(section['kept_dims'])} "
            f"systematic dims kept in fp16 {section['relative_error_outliers_kept']:.4f}"
        ]
