"""How much GPU memory a configured run needs, and how many GPUs of common sizes that means.

    outlier-hydra estimate-vram model=qwen3_30b [dataset.sequence_length=4096 ...]

The same overrides as a run, composed against the same config tree (see launch/vram.py).
"""

from __future__ import annotations

from pathlib import Path

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.launch.vram import CARDS_GB, VramEstimate, estimate
from outlier_hydra.tools.args import compose_config


def table(est: VramEstimate) -> str:
    lines = [
        f"{est.model}  (shape from {est.source})",
        f"  parameters: {est.total_params / 1e9:.2f}B total, {est.active_params / 1e9:.2f}B active per token, "
        f"{est.loaded_params / 1e9:.2f}B loaded (base model)",
        f"  per GPU: weights {est.weights_gb:.1f} GB / n + activations {est.activations_gb:.1f} GB + statistics "
        f"{est.statistics_gb:.2f} GB + overhead {est.overhead_gb:.1f} GB",
        "  card    GPUs   GB per GPU",
    ]
    if est.quantization:
        lines.insert(
            2,
            f"  weights stored as {est.quantization} and loaded as such ({est.weights_gb:.1f} GB; in model.dtype they "
            f"would be {est.dequantized_weights_gb:.1f} GB, which is what transformers loads where the card lacks "
            "the kernels for it)",
        )
    for card in CARDS_GB:
        n = est.gpus_needed(card)
        lines.append(
            f"  {card:>3} GB  {n if n else '-':>4}   {est.per_gpu_gb(n):.1f}"
            if n
            else f"  {card:>3} GB     -   does not fit on 8"
        )
    best = next(((c, est.gpus_needed(c)) for c in CARDS_GB if est.gpus_needed(c) == 1), None)
    if best:
        lines.append(f"  smallest single card that fits: {best[0]} GB")
    return "\n".join(lines)


def command(paths: list[Path], overrides: list[str], out: Path | None) -> str:
    if paths or out is not None:
        raise OutlierHydraError("estimate-vram: takes only key=value overrides, as a run does")
    return table(estimate(compose_config(overrides)))
