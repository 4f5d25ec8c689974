"""The experts stage's outputs: its result section (super experts, super-weight candidates, every
unit), the tables report.html and W&B show, the summary lines and the heat map.

Super experts (Su et al. 2025, arXiv 2507.23279): a routed expert whose max |down_proj output| is above
the `super_percentile` percentile of all routed experts' maxima and above `super_fraction` x the
largest. Super weights (Yu et al. 2024, arXiv 2411.07191): where an output spike is made, its
candidate is the input channel with the largest contribution |W[row, col] x[col]| at that token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from outlier_hydra.stages.experts.stats import KINDS, UNKNOWN_TOKEN, ExpertStats
from outlier_hydra.stages.protocol import ReportContext


def section(stats: ExpertStats, ctx: ReportContext, cfg: Any) -> dict:
    """The experts section of a result document, from merged statistics and the stage's settings."""
    s = stats
    length = ctx.token_ids.shape[1] if ctx.token_ids is not None else None
    per_row_counts: dict[int, list[tuple[int, int]]] = {}
    for (row, dim), c in zip(s.count_keys.tolist(), s.counts.tolist()):
        per_row_counts.setdefault(row, []).append((c, dim))
    units: list[dict[str, Any]] = []
    for r in range(len(s.tokens)):
        layer, kind, index, expert = (int(v) for v in s.keys[r])
        entry: dict[str, Any] = {
            "layer": layer,
            "kind": KINDS[kind],
            "expert": expert if kind == 0 else index,
            "tokens": int(s.tokens[r]),
            "max_output": float(s.out_max[r]) if s.out_max[r] >= 0 else None,
            "max_output_dim": int(s.out_dim[r]),
            "max_input": float(s.in_max[r]) if s.in_max[r] >= 0 else None,
            "max_input_channel": int(s.in_channel[r]),
            "outlier_dims": [
                {"dim": d, "count": c} for c, d in sorted(per_row_counts.get(r, []), key=lambda t: (-t[0], t[1]))[:5]
            ],
        }
        if s.out_max[r] >= 0:
            entry["max_output_at"] = where(int(s.out_token[r]), length, ctx)
            # the rows of largest max |y| whose token is known: which tokens make the spikes
            entry["top_outputs"] = [
                {"value": float(v), "dim": int(d), **where(int(t), length, ctx)}
                for v, d, t in zip(s.top_out[r], s.top_dim[r], s.top_token[r])
                if v >= 0 and t < UNKNOWN_TOKEN
            ]
            median = float(s.median_abs_weight[r])
            entry["super_weight_candidate"] = {
                "row": int(s.out_dim[r]),
                "col": int(s.col[r]),
                "weight": float(s.weight[r]),
                "ratio_to_median_abs_weight": float(abs(s.weight[r]) / median) if median > 0 else None,
                "contribution": float(s.contribution[r]),
            }
        units.append(entry)
    routed = [u for u in units if u["kind"] == "routed" and u["max_output"] is not None]
    maxima = np.asarray([u["max_output"] for u in routed]) if routed else np.zeros(0)
    supers = []
    if len(maxima):
        cut = float(np.percentile(maxima, cfg.super_percentile))
        largest = float(maxima.max())
        supers = [
            {k: u[k] for k in ("layer", "expert", "max_output", "max_output_dim", "max_output_at", "top_outputs", "tokens")}
            for u in routed
            if u["max_output"] > cut and u["max_output"] > cfg.super_fraction * largest
        ]
        supers.sort(key=lambda u: -u["max_output"])
        positions_share(supers, ctx)
    candidates = sorted(
        (u for u in units if u.get("super_weight_candidate") and u["super_weight_candidate"]["ratio_to_median_abs_weight"]),
        key=lambda u: -abs(u["super_weight_candidate"]["contribution"]),
    )
    seen: dict[int, int] = {}
    for u in units:
        if u["kind"] == "routed":
            seen[u["layer"]] = seen.get(u["layer"], 0) + u["tokens"]
    return {
        # MoE layers whose experts module is not given the expert choices (or runs them in a way
        # this stage does not read, e.g. Llama-4, JetMoE): their routed experts are not observed
        "unobserved_layers": sorted(layer for layer, n in seen.items() if n == 0),
        "criteria": {
            "magnitude_threshold": float(cfg.magnitude_threshold),
            "super_percentile": cfg.super_percentile,
            "super_fraction": cfg.super_fraction,
        },
        "super_experts": supers,
        "super_weight_candidates": [
            {"layer": u["layer"], "kind": u["kind"], "expert": u["expert"], **u["super_weight_candidate"]}
            for u in candidates[: cfg.top_units]
        ],
        "units": units,
        # units the stage could not read (no matmul gives the block's output, ...), with the reason
        "unobserved": [
            {"layer": int(layer), "kind": KINDS[kind], "index": int(index), "module": str(module), "reason": str(reason)}
            for (layer, kind, index), module, reason in zip(
                s.unobserved_keys.tolist(), s.unobserved_module.tolist(), s.unobserved_reason.tolist()
            )
        ],
    }


def where(token: int, length: int | None, ctx: ReportContext) -> dict[str, Any]:
    """A global token index as the report gives it: sequence, position, token id and token
    (as far as known: no index for an unknown token, no id for another shard's sequence)."""
    where: dict[str, Any] = {"token_index": token if token < UNKNOWN_TOKEN else None}
    if length and token < UNKNOWN_TOKEN:
        seq, pos = divmod(token, length)
        where.update(sequence=seq, position=pos)
        if ctx.token_ids is not None and 0 <= seq - ctx.first_sequence < len(ctx.token_ids):
            tok = int(ctx.token_ids[seq - ctx.first_sequence, pos])
            where["token_id"] = tok
            if ctx.tokenizer is not None:
                where["token"] = ctx.tokenizer.convert_ids_to_tokens(tok)
    return where


def positions_share(supers: list[dict], ctx: ReportContext) -> None:
    """For each super expert, with the moe_routing statistics of the same document: the share of
    the systematic features' outlier positions at its layer's MLP input that were routed to it
    (choices of it / outlier positions, summed over the systematic dims)."""
    router = ctx.extras.get("moe_routing")
    if router is None:
        return
    dims = {r["feature_dim"] for r in ctx.records}
    rows = {int(layer): i for i, layer in enumerate(router.layers.tolist())}
    for s in supers:
        row = rows.get(s["layer"])
        chosen = positions = 0
        for j, (r, d) in enumerate(router.feat_keys.tolist()):
            if r == row and d in dims:
                chosen += int(router.feat_counts[j][s["expert"]])
                positions += int(router.feat_positions[j])
        s["systematic_outlier_positions"] = positions
        s["systematic_outlier_positions_routed_to_it"] = chosen
        s["systematic_outlier_positions_share"] = chosen / positions if positions else None


# pragma: no mutate start (drawing only: the numbers drawn are the section's, tested there)
def plots(section: dict, folder: Path) -> dict[str, Path]:
    """expert_max_output.png: layer x expert heat map of max |down_proj output|, super experts marked."""
    routed = [u for u in section["units"] if u["kind"] == "routed" and u["max_output"] is not None]
    if not routed:
        return {}
    from outlier_hydra.figures import pyplot, save_figure

    plt = pyplot()
    layers = sorted({u["layer"] for u in routed})
    n_exp = max(u["expert"] for u in routed) + 1
    grid = np.full((len(layers), n_exp), np.nan)
    for u in routed:
        grid[layers.index(u["layer"]), u["expert"]] = u["max_output"]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * n_exp), 1.5 + 0.3 * len(layers)))
    im = ax.imshow(np.log10(np.maximum(grid, 1e-6)), aspect="auto", cmap="viridis", interpolation="nearest")
    for s in section["super_experts"]:
        ax.scatter([s["expert"]], [layers.index(s["layer"])], marker="o", s=60, facecolors="none", edgecolors="red")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=ax, label="log10 max |down_proj output|")
    ax.set_title("Max |down_proj output| per expert (red circles: super experts)", fontsize=9)
    return {"expert_max_output": save_figure(fig, folder / "expert_max_output.png")}


# pragma: no mutate end


def rows(section: dict, top_units: int) -> dict[str, tuple[list[str], list[list]]]:
    supers = [
        [
            s["layer"],
            s["expert"],
            s["max_output"],
            s["max_output_dim"],
            s["max_output_at"].get("token", ""),
            " ".join(str(t.get("token", t.get("token_index"))) for t in s.get("top_outputs", [])),
        ]
        for s in section["super_experts"]
    ]
    weights = [
        [w["layer"], w["kind"], w["expert"], w["row"], w["col"], w["weight"], w["ratio_to_median_abs_weight"]]
        for w in section["super_weight_candidates"]
    ]
    top = sorted((u for u in section["units"] if u["max_output"] is not None), key=lambda u: -u["max_output"])[:top_units]
    units = [
        [u["layer"], u["kind"], u["expert"], u["tokens"], u["max_output"], u["max_output_dim"], u["max_input"]] for u in top
    ]
    return {
        "super_experts": (["layer", "expert", "max_output", "dim", "token", "top_tokens"], supers),
        "super_weight_candidates": (["layer", "kind", "expert", "row", "col", "weight", "ratio_to_median"], weights),
        "largest_outputs": (["layer", "kind", "expert", "tokens", "max_output", "dim", "max_input"], units),
    }


def summary(section: dict) -> list[str]:
    supers = section["super_experts"]
    lines = []
    if section.get("unobserved_layers"):
        lines.append(f"routed experts not observable in layers {section['unobserved_layers']}")
    if section.get("unobserved"):
        first = section["unobserved"][0]
        lines.append(f"{len(section['unobserved'])} units not observable (e.g. {first['module']}: {first['reason']})")
    if not supers:
        return lines + ["no super experts"]
    return lines + [f"super experts: {', '.join(named(s) for s in supers[:6])}"]


def named(s: dict) -> str:
    """'layer 1 expert 68 (744 on 'the', ',')': its max |out| and the first three distinct tokens
    of its top outputs (where the tokens are known)."""
    tokens = list(dict.fromkeys(t["token"] for t in s.get("top_outputs", []) if "token" in t))[:3]
    on = f" on {', '.join(map(repr, tokens))}" if tokens else ""
    return f"layer {s['layer']} expert {s['expert']} ({s['max_output']:.0f}{on})"
