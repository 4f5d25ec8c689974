"""Families beyond the first four: tiny random models of each, an outlier planted in the embeddings,
the full default pipeline, and an independent recomputation from plain pre-hooks on the modules this
file names (not the project's discovery): every systematic feature, and for MoE layers the routing the
model really does. The whole list is the census (`make census`, docs/architectures.md); these are the
representative set: every MoE family that builds on a CPU and each norm / residual layout."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_cfg, tiny_overrides
from helpers import full_activations, layer_problems, mismatches, module_input_tables, stacked, sub_block_inputs

from outlier_hydra.pipeline import run

PLANT = 13
ATTN, MLP = "layers.{i}.self_attn", "layers.{i}.mlp"

# model type -> (mixer input, MLP input[, router, experts]); "a|b": whichever the layer has, None: none.
# Router and experts default to {mlp}.gate|{mlp}.router and {mlp}.experts where the MLP is an MoE block.
LAYOUTS: dict[str, tuple] = {
    # pre-norm decoders (norm output = block input)
    "llama": (ATTN, MLP),
    "qwen3": (ATTN, MLP),
    # the norm after attention is applied to its output: the MLP reads the residual stream itself
    "olmo2": (ATTN, MLP),
    "gemma3_text": (ATTN, MLP),
    # their own names
    "gpt2": ("h.{i}.attn", "h.{i}.mlp"),
    "opt": ("decoder.layers.{i}.self_attn", "decoder.layers.{i}.fc1"),
    "bloom": ("h.{i}.self_attention", "h.{i}.mlp"),
    # parallel residual: one tensor (or two norms of the same stream) feeds both blocks
    "gptj": ("h.{i}.attn", "h.{i}.mlp"),
    "gpt_neox": ("layers.{i}.attention", "layers.{i}.mlp"),
    "phi": (ATTN, MLP),
    "falcon": ("h.{i}.self_attention", "h.{i}.mlp"),
    "cohere": (ATTN, MLP),
    # post-norm encoder
    "bert": ("encoder.layer.{i}.attention", "encoder.layer.{i}.intermediate"),
    # no MLP; recurrent mixers; hybrids
    "mamba": ("layers.{i}.mixer", None),
    "rwkv": ("blocks.{i}.attention", "blocks.{i}.feed_forward"),
    "recurrent_gemma": ("layers.{i}.temporal_block", "layers.{i}.mlp_block"),
    "falcon_h1": ("layers.{i}.mamba", "layers.{i}.feed_forward"),
    "bamba": ("layers.{i}.mamba|layers.{i}.self_attn", "layers.{i}.feed_forward"),
    # MoE
    "olmoe": (ATTN, MLP),
    "qwen2_moe": (ATTN, MLP),
    "qwen3_moe": (ATTN, MLP),
    "mixtral": (ATTN, MLP),
    "gpt_oss": (ATTN, MLP, "{mlp}.router", "{mlp}.experts"),
    "deepseek_v2": (ATTN, MLP),
    "deepseek_v3": (ATTN, MLP),
    "glm4_moe": (ATTN, MLP),
    "phimoe": (ATTN, MLP, "{mlp}.router", "{mlp}.experts"),
    "granitemoe": (ATTN, "layers.{i}.block_sparse_moe", "{mlp}.router", "{mlp}.experts"),
    "granitemoeshared": (ATTN, "layers.{i}.block_sparse_moe", "{mlp}.router", "{mlp}.experts"),
    "llama4_text": (ATTN, "layers.{i}.feed_forward", "{mlp}.router", "{mlp}.experts"),
    "jamba": ("layers.{i}.mamba|layers.{i}.self_attn", "layers.{i}.feed_forward", "{mlp}.router", "{mlp}.experts"),
    "qwen3_next": ("layers.{i}.linear_attn|layers.{i}.self_attn", MLP),
    # gated-DeltaNet layers register their output projection first
    "qwen3_5_moe_text": ("layers.{i}.linear_attn|layers.{i}.self_attn", MLP),
    "ernie4_5_moe": (ATTN, MLP),
    "hunyuan_v1_moe": (ATTN, MLP, "{mlp}.gate.wg", "{mlp}.experts"),
    "minimax": (ATTN, "layers.{i}.mlp", "{mlp}.gate", "{mlp}.experts"),
    "flex_olmo": (ATTN, MLP),
    "exaone_moe": (ATTN, MLP),
}


def _expected(model, model_type: str, layers: int):
    layout = LAYOUTS[model_type]
    modules = dict(model.named_modules())

    def pick(template, i, **kw):
        if template is None:
            return None
        options = [t.format(i=i, **kw) for t in template.split("|")]
        found = [o for o in options if o in modules]
        assert found, f"none of {options} in {model_type}"
        return found[0]

    points, moe = [], {}
    for i in range(layers):
        mixer, mlp = pick(layout[0], i), pick(layout[1], i)
        points += [(f"layer_{i}_ln_attn", mixer)] + ([(f"layer_{i}_ln_mlp", mlp)] if mlp else [])
        if mlp is None:
            continue
        router_t = layout[2] if len(layout) > 2 else "{mlp}.gate|{mlp}.router"
        experts_t = layout[3] if len(layout) > 3 else "{mlp}.experts"
        router = next((r for r in (t.format(mlp=mlp) for t in router_t.split("|")) if r in modules), None)
        experts = experts_t.format(mlp=mlp)
        if router is not None and experts in modules:  # an MoE layer (dense-first layers have neither)
            moe[i] = (mlp, router, experts)
    return points, moe


# Where the choices are read elsewhere than the router's output; checked in test_moe.py, whose
# routing tests `make mutation` runs against the moe_routing stage.
ROUTING_ELSEWHERE = ("hunyuan_v1_moe", "llama4_text")


@pytest.mark.parametrize("model_type", sorted(set(LAYOUTS) - set(ROUTING_ELSEWHERE)))
def test_family_hook_points_and_numbers_equal_the_recomputation(model_type, tmp_path):
    check_family(model_type, tmp_path)


def check_family(model_type: str, tmp_path, *extra: str) -> None:
    """The family's hook points, MoE layers, routers and experts as LAYOUTS says, and every number
    of the run (with these extra overrides) equal to the recomputation from plain hooks."""
    from transformers import AutoModel

    from outlier_hydra.models.configs import config_top_k
    from outlier_hydra.testing.tiny import build

    folder = build(model_type, tmp_path / "model", plant_dim=PLANT)
    results = run(
        make_cfg(*tiny_overrides(folder, f"model.tokenizer={folder / 'tokenizer'}", "plots=false"), *extra), tmp_path / "run"
    )

    model = AutoModel.from_pretrained(folder)
    layers = model.config.get_text_config().num_hidden_layers
    points, moe = _expected(model, model_type, layers)
    structure = results["model"]["structure"]
    assert [(p["name"], p["module"]) for p in structure["hook_points"]] == points
    assert structure["moe_layers"] == sorted(moe)
    assert {int(i): (r["router"], r["experts"]) for i, r in structure["routers"].items()} == {
        i: m[1:] for i, m in moe.items()
    }

    ids = np.load(tmp_path / "run" / "token_ids.npy")
    acts, tables = module_input_tables(
        folder, [p for _, p in points], moe, ids, batch_size=4, top_k=config_top_k(model.config.get_text_config())
    )
    assert mismatches(results, acts, tables) == []
    # by a rule of its own (what each layer passes to its children), not by LAYOUTS nor discovery
    inputs = sub_block_inputs(folder, ids, batch_size=4)
    assert layer_problems(results, inputs) == []
    assert mismatches(results, stacked(inputs), tables) == []
    assert PLANT in {r["feature_dim"] for r in results["systematic_outliers"]}
    if moe:
        assert len(results["moe_routing"]["layers"]) == len(moe)
    if "massive_activations" in results:  # every layer's output, the last one too: its top values
        stream = full_activations(folder, [p.rpartition(".")[0] for n, p in points if n.endswith("_attn")], ids, 4)
        section = results["massive_activations"]["layers"]
        assert [entry["layer"] for entry in section] == list(range(layers))
        for entry in section:
            largest = np.sort(np.abs(stream[entry["layer"]]).ravel())[::-1][: len(entry["top"])]
            assert entry["top"] and [abs(t["value"]) for t in entry["top"]] == pytest.approx(largest.tolist(), rel=1e-6)


def test_a_family_discovery_cannot_handle_fails_fast_naming_the_key(tmp_path):
    """LongCat-Flash keeps two sub-layers per layer (no list of num_hidden_layers layers): one line
    naming model.name and the model.structure key, in under a second, nothing written."""
    import subprocess
    import sys
    import time

    from conftest import REPO

    from outlier_hydra.errors import OutlierHydraError
    from outlier_hydra.pipeline.plan import prepare
    from outlier_hydra.testing.tiny import build

    folder = build("longcat_flash", tmp_path / "model", plant_dim=None)
    overrides = tiny_overrides(folder, f"model.tokenizer={folder / 'tokenizer'}")
    t0 = time.perf_counter()
    with pytest.raises(OutlierHydraError, match="model.structure.layers"):
        prepare(make_cfg(*overrides))
    assert time.perf_counter() - t0 < 1.0
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", *overrides, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outlier_hydra: error: model.name:")
    assert "model.structure.layers" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == [".hydra", "outlier_hydra.log"]  # Hydra's own, nothing of ours


def test_model_structure_overrides_discovery(tmp_path):
    """model.structure from the command line: the hook points read the q_proj / gate_proj inputs (the
    same normed hidden state), the routing stage is switched off by router=none."""
    from outlier_hydra.testing.tiny import build

    folder = build("qwen2_moe", tmp_path / "model", plant_dim=PLANT)
    results = run(
        make_cfg(
            *tiny_overrides(
                folder,
                f"model.tokenizer={folder / 'tokenizer'}",
                "plots=false",
                "model.structure.mixer=layers.*.self_attn.q_proj",
                "model.structure.mlp='layers.{i}.mlp.shared_expert'",
                "model.structure.router=none",
            )
        ),
        tmp_path / "run",
    )
    structure = results["model"]["structure"]
    assert structure["source"] == "model.structure" and structure["moe_layers"] == []
    paths = [p["module"] for p in structure["hook_points"]]
    assert paths[:2] == ["layers.0.self_attn.q_proj", "layers.0.mlp.shared_expert"]
    assert "moe_routing" not in results
    ids = np.load(tmp_path / "run" / "token_ids.npy")
    acts, _ = module_input_tables(folder, paths, {}, ids, batch_size=4)
    assert mismatches(results, acts, {}) == []


def test_jetmoe_needs_and_takes_an_override(tmp_path):
    """JetMoE's attention is itself a mixture of experts: both blocks look like MoE blocks, so
    discovery stops naming model.structure.mixer; the two paths from the command line analyse it,
    features and routing equal to the recomputation."""
    from outlier_hydra.errors import OutlierHydraError
    from outlier_hydra.pipeline.plan import prepare
    from outlier_hydra.testing.tiny import build

    folder = build("jetmoe", tmp_path / "model", plant_dim=PLANT)
    base = tiny_overrides(folder, f"model.tokenizer={folder / 'tokenizer'}", "plots=false")
    with pytest.raises(OutlierHydraError, match=r"every block .* looks like an MLP .*model\.structure\.mixer"):
        prepare(make_cfg(*base))
    paths = ["model.structure.mixer=layers.*.self_attention", "model.structure.mlp=layers.*.mlp"]
    results = run(make_cfg(*base, *paths), tmp_path / "run")
    moe = {i: (f"layers.{i}.mlp", f"layers.{i}.mlp.router.layer", None) for i in range(4)}
    points = [p["module"] for p in results["model"]["structure"]["hook_points"]]
    assert points[:2] == ["layers.0.self_attention", "layers.0.mlp"]
    ids = np.load(tmp_path / "run" / "token_ids.npy")
    acts, tables = module_input_tables(folder, points, moe, ids, batch_size=4, top_k=2)
    assert mismatches(results, acts, tables) == []
    assert results["experts"]["unobserved_layers"] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "preset,mixer,mlp,moe_layers,dense,router,experts,shared",
    [
        ("qwen3_30b", "self_attn", "mlp", 48, [], "mlp.gate", 128, []),
        ("gpt_oss_120b", "self_attn", "mlp", 36, [], "mlp.router", 128, []),  # intermediate = hidden = 2880
        ("deepseek_v2_lite", "self_attn", "mlp", 26, [0], "mlp.gate", 64, ["mlp.shared_experts"]),
        ("qwen3_next_80b", "linear_attn", "mlp", 48, [], "mlp.gate", 512, ["mlp.shared_expert"]),
    ],
)
def test_discovery_on_the_real_shapes(preset, mixer, mlp, moe_layers, dense, router, experts, shared):
    """The presets' real shapes, built on the meta device from their architecture blocks (offline):
    hook points, dense-first layers, routers, expert counts and shared experts where the papers say."""
    from outlier_hydra.models.discovery import model_structure
    from outlier_hydra.models.size import hf_config

    cfg = make_cfg(f"model={preset}")
    config, _ = hf_config(cfg.model)
    structure = model_structure(cfg.model, config)
    d = structure.describe(list(range(len(structure.layers))))
    assert [p["module"] for p in d["hook_points"][:2]] == [f"layers.0.{mixer}", f"layers.0.{mlp}"]
    assert len(d["moe_layers"]) == moe_layers and d["dense_mlp_layers"] == dense
    r = d["routers"][str(d["moe_layers"][0])]
    i = d["moe_layers"][0]
    assert (r["router"], r["num_experts"]) == (f"layers.{i}.{router}", experts)
    assert r["shared_experts_always_on"] == [f"layers.{i}.{s}" for s in shared]
