"""Where the massive activations were routed: the share of them that a super expert received.

Su et al. 2025 find that a few super experts make the massive activations. Once the run knows both
(the experts stage's `super_experts`, the massive_activations stage's `massive` entries), this "post"
stage runs one forward over the sequences that hold massive activations and reads, at each super
expert's layer, the expert choices the model makes for those tokens (where the structure's probe
found them: collect.hooks.choices_hook). Per super expert (layer l, expert e): the
massive activations in the residual stream after layer l or later, their distinct token positions,
how many of those positions chose e at layer l, and the share. It needs both stages on
(massive_activations is off by default); otherwise its section says which is missing and nothing
runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from outlier_hydra.collect.hooks import attached, choices_hook
from outlier_hydra.stages.protocol import POST, PostContext, Stage


@dataclass
class MassiveRoutingConfig:
    """conf/analysis/stages/massive_routing.yaml"""

    enabled: bool = MISSING
    batch_size: int = MISSING  # sequences per forward


class MassiveRouting(Stage):
    name = "massive_routing"
    Config = MassiveRoutingConfig
    phase = POST

    def bind(self, structure, layers: list[int]) -> bool:
        super().bind(structure, layers)
        return any(structure.moe(i) is not None for i in layers)

    @torch.inference_mode()
    def measure(self, ctx: PostContext) -> dict:
        experts, massive = ctx.results.get("experts"), ctx.results.get("massive_activations")
        missing = [name for name, section in (("experts", experts), ("massive_activations", massive)) if section is None]
        if missing:
            return {"super_experts": [], "needs": missing}
        assert experts is not None and massive is not None
        supers = experts["super_experts"]
        found = [(entry["layer"], m) for entry in massive["layers"] for m in entry["massive"]]
        wanted = {s["layer"]: {(m["sequence"], m["position"]) for layer, m in found if layer >= s["layer"]} for s in supers}
        sequences = sorted({seq for positions in wanted.values() for seq, _ in positions})
        choices = self._choices(ctx, sorted(wanted), sequences) if sequences else {}
        out = []
        for s in supers:
            positions = sorted(wanted[s["layer"]])
            routed = sum(1 for seq, pos in positions if s["expert"] in choices.get((s["layer"], seq, pos), ()))
            out.append(
                {
                    "layer": s["layer"],
                    "expert": s["expert"],
                    "massive_activations": sum(1 for layer, _ in found if layer >= s["layer"]),
                    "positions": len(positions),
                    "positions_routed_to_it": routed,
                    "share": routed / len(positions) if positions else None,
                }
            )
        return {"super_experts": out}

    def _choices(self, ctx: PostContext, layers: list[int], sequences: list[int]) -> dict:
        """(layer, sequence, position) -> the experts chosen there."""
        assert ctx.sequences is not None and ctx.structure is not None
        model, device = ctx.model()
        out: dict[tuple[int, int, int], tuple[int, ...]] = {}
        current: list[int] = []
        length = [0]

        def receive(layer):
            def fn(index, weights):
                index = index.reshape(len(current), length[0], -1).cpu()
                for b, seq in enumerate(current):
                    for pos in range(length[0]):
                        out[(layer, seq, pos)] = tuple(index[b, pos].tolist())

            return fn

        hooks = [choices_hook(moe, receive(layer)) for layer in layers if (moe := ctx.structure.moe(layer))]
        with attached(model, hooks):
            for start in range(0, len(sequences), self.config.batch_size):
                current[:] = sequences[start : start + self.config.batch_size]
                ids = ctx.sequences(device, current)
                length[0] = ids.shape[1]
                model(input_ids=ids)
        return out

    def rows(self, section: dict) -> dict[str, tuple[list[str], list[list]]]:
        rows = [
            [s["layer"], s["expert"], s["positions"], s["positions_routed_to_it"], s["share"]]
            for s in section["super_experts"]
        ]
        return {"super_experts": (["layer", "expert", "massive_positions", "routed_to_it", "share"], rows)}

    def summary(self, section: dict) -> list[str]:
        return [
            f"layer {s['layer']} expert {s['expert']} received {s['positions_routed_to_it']} of the {s['positions']} "
            "massive-activation positions after it"
            for s in section["super_experts"]
        ]
