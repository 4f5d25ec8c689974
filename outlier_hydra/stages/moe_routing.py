"""Router and expert statistics of MoE layers: the router's logits and the expert choices the model
really makes (models/probe.py finds both: the router's own output, e.g. OLMoE, Mixtral, Qwen
and gpt-oss give (logits, top-k weights, top-k indices); else the experts module's arguments, e.g.
DeepSeek-V3 after its bias and grouped top-k; else the top-k of the softmax of the logits). Shared
experts are always on and never counted as a choice. Per MoE layer, on the device:
  R = one-hot of the top-k choices [N, E]        H = (|x| >= t) at that layer's MLP input [N, D]
  expert_counts += R.sum(0)                      tokens routed to each expert (top-k choices)
  entropy_sum   += sum_p H(softmax(logits_p))    top1_share_sum += sum_p w_top1 / sum_k w_k
  per feature d: counts[d, e] = (H^T R)[d, e]    expert choices at d's outlier positions, with the
                 positions, entropy and top-1 share at those positions (H^T applied to each)
H^T R is one small matmul per layer: exact counts, no host sync (on the CPU: H as the positions
where |x| >= t, found in one read of x, and every sum in one pass, by collect/fused_cpu.cpp).
Per-feature rows are kept only for dims that had an outlier at that layer (a handful), so the
statistics stay small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING

from outlier_hydra.collect import fused_cpu
from outlier_hydra.collect.hooks import choices_hook, on_input
from outlier_hydra.collect.reductions import at_least
from outlier_hydra.collect.transfer import to_host
from outlier_hydra.stages.protocol import ArrayStats, Reach, ReportContext, Stage


@dataclass
class RouterStats(ArrayStats):
    layers: np.ndarray  # [L] analysed MoE layer indices
    expert_counts: np.ndarray  # [L, E] int64
    tokens: np.ndarray  # [L] int64
    entropy_sum: np.ndarray  # [L] float64
    top1_share_sum: np.ndarray  # [L] float64
    feat_keys: np.ndarray  # [K, 2] int64 (layer row, dim), sorted
    feat_counts: np.ndarray  # [K, E] int64
    feat_positions: np.ndarray  # [K] int64
    feat_entropy_sum: np.ndarray  # [K] float64
    feat_share_sum: np.ndarray  # [K] float64

    def merge(self, other: RouterStats) -> RouterStats:
        if not np.array_equal(self.layers, other.layers):
            raise ValueError("router statistics of different layers")
        rows: dict[tuple[int, int], list] = {}
        for s in (self, other):
            for i, key in enumerate(map(tuple, s.feat_keys.tolist())):
                cur = rows.setdefault(key, [0, 0, 0.0, 0.0])
                cur[0] = cur[0] + s.feat_counts[i]
                cur[1] += int(s.feat_positions[i])
                cur[2] += float(s.feat_entropy_sum[i])
                cur[3] += float(s.feat_share_sum[i])
        keys = sorted(rows)
        e = self.expert_counts.shape[1]
        return RouterStats(
            layers=self.layers,
            expert_counts=self.expert_counts + other.expert_counts,
            tokens=self.tokens + other.tokens,
            entropy_sum=self.entropy_sum + other.entropy_sum,
            top1_share_sum=self.top1_share_sum + other.top1_share_sum,
            feat_keys=np.asarray(keys, np.int64).reshape(-1, 2),
            feat_counts=np.asarray([rows[k][0] for k in keys], np.int64).reshape(-1, e),
            feat_positions=np.asarray([rows[k][1] for k in keys], np.int64),
            feat_entropy_sum=np.asarray([rows[k][2] for k in keys], np.float64),
            feat_share_sum=np.asarray([rows[k][3] for k in keys], np.float64),
        )


@dataclass
class MoeRoutingConfig:
    """conf/analysis/stages/moe_routing.yaml"""

    enabled: bool = MISSING
    magnitude_threshold: float = MISSING  # outlier positions for the per-feature expert statistics
    top_experts: int = MISSING


class MoeRouting(Stage):
    """Router/expert statistics of MoE layers. Its threshold is fixed, not the analysis threshold, so
    that one collection still serves a whole threshold sweep."""

    name = "moe_routing"
    Config = MoeRoutingConfig
    Stats = RouterStats

    def __init__(self, config):
        super().__init__(config)
        self.threshold = float(config.magnitude_threshold)
        self.top_experts = int(config.top_experts)

    def bind(self, structure, layers: list[int]) -> bool:
        moe_layers = [i for i in layers if structure.moe(i) is not None]
        if not moe_layers:
            return False
        super().bind(structure, moe_layers)
        self.row = {layer: r for r, layer in enumerate(self.layers)}
        return True

    # ---- device side ------------------------------------------------------------------------
    def start_batch(self, first_sequence: int) -> None:
        self.state: dict[int, torch.Tensor] = {}  # per layer, one float64 vector (finish_batch unpacks it)
        self.tokens: dict[int, int] = {}
        self.pending_h: dict[int, torch.Tensor] = {}
        self.pending_logits: dict[int, torch.Tensor] = {}

    def stop_after(self, layer: int) -> tuple | None:
        """What the forward must reach in the pass's last layer: the router, or the experts' input
        where the choices are read there."""
        moe = self.structure.moe(layer)
        if moe is None or layer not in self.row:
            return None
        if moe.choices == "experts":
            return Reach.EXPERTS_INPUT, moe.experts, "pre"
        return Reach.ROUTER, moe.router

    def hooks(self, layers: list[int]):
        out: list[tuple] = []
        for layer in layers:
            moe = self.structure.moe(layer)
            if moe is None or layer not in self.row:
                continue
            out.append(on_input(moe.block, self.structure.inputs.get(moe.block, 0), self._mlp_input_hook(layer)))
            out.append((moe.router, self._logits_hook(layer, moe)))
            out.append(choices_hook(moe, self._choices_receiver(layer)))  # after the logits
        return out

    def _mlp_input_hook(self, layer: int):
        def hook(x):
            x = x.detach().reshape(-1, x.shape[-1])
            if x.device.type == "cpu" and fused_cpu.available():  # the few outlier positions, one read of x
                self.pending_h[layer] = (fused_cpu.hits(x, self.threshold), x.shape[1])
            else:  # NaN, Inf: see the main stats
                self.pending_h[layer] = at_least(x.abs(), self.threshold).float()

        return hook

    def _logits_hook(self, layer: int, moe):
        def hook(module, args, output):
            logits = output if moe.logits_at is None else output[moe.logits_at]
            self.pending_logits[layer] = logits.detach().reshape(-1, logits.shape[-1]).float()

        return hook

    def _choices_receiver(self, layer: int):
        def receive(idx, weights):
            self._update(layer, self.pending_logits.pop(layer), idx, weights)

        return receive

    def _update(self, layer: int, logits: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None) -> None:
        idx = idx.reshape(-1, idx.shape[-1])
        h = self.pending_h.pop(layer)
        e = logits.shape[1]
        if isinstance(h, tuple):  # (CPU) h as the flat indices of its ones: every sum in one C++ pass
            flat, d = h
            w = None if weights is None else weights.reshape(idx.shape)
            self._add(layer, fused_cpu.routing(logits, idx, w, flat, d), int(logits.shape[0]), e)
            return
        weights = torch.ones_like(idx, dtype=torch.float32) if weights is None else weights.float()
        weights = weights.reshape(-1, weights.shape[-1])
        idx = idx.long()  # R: top-k choices per expert (an expert listed twice counts twice)
        one_hot = torch.zeros_like(logits).scatter_add_(1, idx, torch.ones(idx.shape, dtype=logits.dtype, device=idx.device))
        probs = torch.softmax(logits, -1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        share = weights.max(-1).values / weights.sum(-1).clamp_min(1e-30)
        # the four per-feature sums at once, one matmul, no host sync: H^T [R | entropy | share | 1]
        v = torch.cat([one_hot, entropy[:, None], share[:, None], torch.ones_like(share)[:, None]], 1)
        per_feature = (h.t() @ v).double()
        upd = torch.cat(
            [
                one_hot.sum(0).double(),  # expert_counts
                entropy.double().sum()[None],  # entropy_sum
                share.double().sum()[None],  # top1_share_sum
                per_feature.t().reshape(-1),  # [E + 3, D]: choices per expert, entropy, share, positions
            ]
        )
        self._add(layer, upd, int(logits.shape[0]), e)

    def _add(self, layer: int, upd: torch.Tensor, tokens: int, width: int) -> None:
        """Add one pass's sums [E + 2 + (E + 3) D] (a layer's router may run twice in a pass)."""
        st = self.state.get(layer)
        self.state[layer] = upd if st is None else st + upd
        self.tokens[layer] = self.tokens.get(layer, 0) + tokens  # a shape: no device read
        self.width = width

    def finish_batch(self) -> RouterStats:
        """Host copies of the per-layer sums and of the per-feature rows only where a dim has outlier
        positions at that layer (all of them would be [layers, D, E] floats: 100 MB on Qwen3-30B)."""
        layers = sorted(self.state)  # every MoE layer of the pass ran (the pass stops after the last)
        rows = [self.row[layer] for layer in layers]
        e = self.width
        n = len(self.layers)
        counts = np.zeros((n, e), np.int64)
        tokens = np.zeros(n, np.int64)
        ent = np.zeros(n)
        share = np.zeros(n)
        state = torch.stack([self.state[layer] for layer in layers])  # [L, E + 2 + (E + 3) D]
        per_layer = to_host(state[:, : e + 2])
        per_feature = state[:, e + 2 :].reshape(len(layers), e + 3, -1)
        at = (per_feature[:, e + 2] > 0).nonzero()  # (layer, dim) with outlier positions, in order
        feat = to_host(per_feature[at[:, 0], :, at[:, 1]])  # [K, E + 3]
        at_host = to_host(at)
        keys = np.stack([np.asarray(rows, np.int64)[at_host[:, 0]], at_host[:, 1]], 1)
        for r, layer, h in zip(rows, layers, per_layer):
            counts[r] = np.rint(h[:e]).astype(np.int64)
            tokens[r] = self.tokens[layer]
            ent[r], share[r] = h[e], h[e + 1]
        self.state, self.tokens = {}, {}
        return RouterStats(
            layers=np.asarray(self.layers, np.int64),
            expert_counts=counts,
            tokens=tokens,
            entropy_sum=ent,
            top1_share_sum=share,
            feat_keys=keys.reshape(-1, 2),
            feat_counts=np.rint(feat[:, :e]).astype(np.int64).reshape(-1, e),
            feat_positions=np.rint(feat[:, e + 2]).astype(np.int64),
            feat_entropy_sum=feat[:, e].astype(np.float64),
            feat_share_sum=feat[:, e + 1].astype(np.float64),
        )

    # ---- report -----------------------------------------------------------------------------
    def report(self, stats: RouterStats, ctx: ReportContext) -> dict:
        r = stats
        per_layer = []
        for i, layer in enumerate(r.layers.tolist()):
            n = max(int(r.tokens[i]), 1)
            per_layer.append(
                {
                    "layer": layer,
                    "magnitude_threshold": self.threshold,
                    "tokens": int(r.tokens[i]),
                    "tokens_per_expert": r.expert_counts[i].tolist(),
                    "entropy_mean": float(r.entropy_sum[i] / n),
                    "top1_share_mean": float(r.top1_share_sum[i] / n),
                }
            )
        index = {tuple(k): j for j, k in enumerate(r.feat_keys.tolist())}
        features = []
        for rec in ctx.records:
            d = rec["feature_dim"]
            layers, total = [], np.zeros(r.expert_counts.shape[1], np.int64)
            for i, layer in enumerate(r.layers.tolist()):
                j = index.get((i, d))
                if j is None:
                    continue
                counts = r.feat_counts[j]
                total += counts
                p = int(r.feat_positions[j])
                layers.append(
                    {
                        "layer": layer,
                        "outlier_positions": p,
                        "top_experts": _top(counts, self.top_experts, positions=p),
                        "entropy_mean": float(r.feat_entropy_sum[j] / p),
                        "top1_share_mean": float(r.feat_share_sum[j] / p),
                    }
                )
            features.append({"feature_dim": d, "top_experts_all_layers": _top(total, self.top_experts), "layers": layers})
        return {"layers": per_layer, "features": features}

    # ---- outputs ----------------------------------------------------------------------------
    # pragma: no mutate start (drawing only: the numbers drawn are the section's, tested there)
    def plots(self, section: dict, folder: Path) -> dict[str, Path]:
        """moe_expert_load.png: per layer, the share of a feature's outlier positions routed to its
        top expert against that expert's share of all tokens."""
        feats = [f for f in section["features"] if f["layers"]][:3]
        if not feats:
            return {}
        from outlier_hydra.figures import pyplot, save_figure

        plt = pyplot()
        fig, axes = plt.subplots(1, len(feats), figsize=(5 * len(feats), 3.8), squeeze=False)
        overall = {layer["layer"]: np.asarray(layer["tokens_per_expert"], float) for layer in section["layers"]}
        tokens = {layer["layer"]: layer["tokens"] for layer in section["layers"]}
        for ax, f in zip(axes[0], feats):
            layers = [entry["layer"] for entry in f["layers"]]
            top_e = [entry["top_experts"][0]["expert"] for entry in f["layers"]]
            at_outliers = [entry["top_experts"][0]["position_share"] for entry in f["layers"]]
            base = [overall[layer][e] / tokens[layer] for layer, e in zip(layers, top_e)]
            ax.plot(layers, at_outliers, marker="o", label="at the feature's outlier positions")
            ax.plot(layers, base, marker="s", linestyle="--", label="over all tokens")
            for layer, e, y in zip(layers, top_e, at_outliers):
                ax.annotate(f"e{e}", (layer, y), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
            ax.set_ylim(0, 1.05)
            ax.set_xticks(layers)
            ax.set_xlabel("MoE layer")
            ax.set_ylabel("share of positions routed to the top expert")
            ax.set_title(f"feature dim {f['feature_dim']}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("Expert load at outlier positions vs overall (annotated: the top expert)", fontsize=9)
        return {"moe_expert_load": save_figure(fig, folder / "moe_expert_load.png")}

    # pragma: no mutate end
    def rows(self, section: dict) -> dict[str, tuple[list[str], list[list]]]:
        top = [
            [f["feature_dim"], e["layer"], e["outlier_positions"], t["expert"], t["position_share"], t["share"]]
            for f in section["features"]
            for e in f["layers"]
            for t in e["top_experts"][:1]
        ]
        layers = [
            [e["layer"], e["entropy_mean"], e["top1_share_mean"], str(e["tokens_per_expert"])] for e in section["layers"]
        ]
        return {
            "feature_top_expert": (
                ["feature_dim", "layer", "outlier_positions", "top_expert", "position_share", "choice_share"],
                top,
            ),
            "layers": (["layer", "entropy_mean", "top1_share_mean", "tokens_per_expert"], layers),
        }

    def summary(self, section: dict) -> list[str]:
        lines = []
        for f in section["features"]:
            top = f["top_experts_all_layers"][:1]
            if top:
                lines.append(
                    f"dim {f['feature_dim']}: outlier positions go most to expert {top[0]['expert']} "
                    f"({100 * top[0]['share']:.0f}% of their top-k choices, over {len(f['layers'])} MoE layers)"
                )
        return lines


def _top(counts: np.ndarray, k: int, positions: int | None = None) -> list[dict]:
    """The k experts with most choices (ties: lower expert id): `share` of all top-k choices and, given
    the number of positions, `position_share`: the fraction of those positions routed to it."""
    total = int(counts.sum())
    order = np.lexsort((np.arange(len(counts)), -counts))[:k]
    out = []
    for e in order:
        if counts[e] > 0:
            entry = {"expert": int(e), "choices": int(counts[e]), "share": float(counts[e] / total)}
            if positions:
                entry["position_share"] = float(counts[e] / positions)
            out.append(entry)
    return out
