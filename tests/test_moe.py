"""MoE-aware stages on tiny models with planted behaviour: a planted router preference shows up as the
experts that receive a feature's outlier positions, with the shares an independent recomputation
gives; a planted massive activation is found at its position and dim; the int8 error with the
outlier dims kept is lower than without and equals a direct computation."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_cfg, tiny_overrides
from helpers import (
    LAYERS,
    decoder_module_paths,
    full_activations,
    int8_recompute,
    plant_massive_activation,
    plant_router_preference,
    routing_recompute,
)

from outlier_hydra.pipeline import run

E_POS, E_NEG = 3, 1


@pytest.fixture(scope="module")
def routed_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    out = {}
    for family in ("olmoe", "qwen3_moe", "mixtral"):
        d = root / family
        shutil.copytree(tiny_models[family], d)
        plant_router_preference(d, dim=7, experts=(E_POS, E_NEG), layers=[1, 2])
        out[family] = d
    return out


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
def test_planted_router_preference_is_reported_with_recomputed_shares(family, routed_models, tmp_path):
    results = run(make_cfg(*tiny_overrides(routed_models[family])), tmp_path)
    moe = results["moe_routing"]
    token_ids = np.load(tmp_path / "token_ids.npy")
    assert 7 in [r["feature_dim"] for r in results["systematic_outliers"]]
    feature = next(f for f in moe["features"] if f["feature_dim"] == 7)
    by_layer = {entry["layer"]: entry for entry in feature["layers"]}
    for layer in (1, 2):
        overall, at_outliers, x = routing_recompute(routed_models[family], token_ids, layer, 7, batch_size=4)
        assert moe["layers"][layer]["tokens_per_expert"] == overall.tolist()
        got = by_layer[layer]
        assert got["outlier_positions"] == int((np.abs(x) >= 6).sum())
        total = at_outliers.sum()
        expected = sorted(range(len(at_outliers)), key=lambda e: (-at_outliers[e], e))[:3]
        assert [t["expert"] for t in got["top_experts"]] == [e for e in expected if at_outliers[e] > 0]
        for t in got["top_experts"]:
            assert t["choices"] == at_outliers[t["expert"]] and t["share"] == at_outliers[t["expert"]] / total
        # the planted preference: outliers of either sign go to the two planted experts
        planted = at_outliers[E_POS] + at_outliers[E_NEG]
        assert planted >= (np.abs(x) >= 6).sum() * 0.95
        assert got["top_experts"][0]["expert"] in (E_POS, E_NEG)  # each token's second choice goes elsewhere
        share_planted = planted / total
        assert share_planted > overall[[E_POS, E_NEG]].sum() / overall.sum()  # concentrated vs overall load
    assert 0 < moe["layers"][0]["entropy_mean"] <= np.log(4) + 1e-6
    assert 0.5 <= moe["layers"][0]["top1_share_mean"] <= 1.0


def test_router_stats_merge_exactly_across_batches(routed_models, tmp_path):
    one = run(make_cfg(*tiny_overrides(routed_models["olmoe"], "analysis.batch_size=8")), tmp_path / "a")
    two = run(make_cfg(*tiny_overrides(routed_models["olmoe"], "analysis.batch_size=2")), tmp_path / "b")
    for a, b in zip(one["moe_routing"]["layers"], two["moe_routing"]["layers"]):
        assert a["tokens_per_expert"] == b["tokens_per_expert"]
        assert a["entropy_mean"] == pytest.approx(b["entropy_mean"], rel=1e-6)
    fa = {f["feature_dim"]: f for f in one["moe_routing"]["features"]}
    fb = {f["feature_dim"]: f for f in two["moe_routing"]["features"]}
    assert fa.keys() == fb.keys()
    for d in fa:
        assert [(l["layer"], l["outlier_positions"], l["top_experts"]) for l in fa[d]["layers"]] == [
            (l["layer"], l["outlier_positions"], l["top_experts"]) for l in fb[d]["layers"]
        ]


def test_router_stage_is_not_applied_to_dense_models(tmp_path):
    results = run(make_cfg("dataset.num_sequences=2", "dataset.sequence_length=32"), tmp_path)  # MiniLM
    assert "moe_routing" not in results


def test_planted_massive_activation_is_found_at_its_position_and_dim(tiny_models, tmp_path):
    model = tmp_path / "massive_model"
    shutil.copytree(tiny_models["olmoe"], model)
    run(make_cfg(*tiny_overrides(model)), tmp_path / "probe")
    token_ids = np.load(tmp_path / "probe" / "token_ids.npy")
    values, counts = np.unique(token_ids, return_counts=True)
    target = int(values[np.argsort(-counts)[3]])  # a frequent token, not the separator
    plant_massive_activation(model, target, dim=13, value=5000.0)
    results = run(make_cfg(*tiny_overrides(model, "analysis.stages.massive_activations.enabled=true")), tmp_path / "run")
    section = results["massive_activations"]
    where = {(int(s), int(p)) for s, p in zip(*np.nonzero(token_ids == target))}
    for layer in section["layers"]:
        massive = layer["massive"]
        assert massive, f"layer {layer['layer']}"
        assert all(m["dim"] == 13 and (m["sequence"], m["position"]) in where and m["token_id"] == target for m in massive)
        assert abs(massive[0]["value"]) > 1000
        assert massive[0]["token"]  # decoded
    # against the residual stream itself (plain hooks on each layer's output): the values, and the
    # median read off a histogram of 10 bins per decade: within half a bin, a factor 10**0.05
    stream = full_activations(model, [f"layers.{i}" for i in range(LAYERS)], token_ids, batch_size=4)
    for layer in section["layers"]:
        x = stream[layer["layer"]].reshape(len(token_ids), -1, stream.shape[-1])
        true_median = float(np.median(np.abs(x)))
        assert 10**-0.05 <= layer["median_abs"] / true_median <= 10**0.05, (layer["median_abs"], true_median)
        for m in layer["top"]:
            assert m["value"] == pytest.approx(x[m["sequence"], m["position"], m["dim"]], rel=1e-6)
        largest = np.sort(np.abs(x).ravel())[::-1][: len(layer["top"])]
        assert [abs(m["value"]) for m in layer["top"]] == pytest.approx(largest.tolist(), rel=1e-6)
    # in the batch files too
    batch = json.loads((tmp_path / "run" / "batch_001_results.json").read_text())
    assert batch["massive_activations"]["layers"][0]["massive"]


def test_int8_error_over_several_batches_equals_direct_computation(tiny_models, tmp_path):
    results = run(
        make_cfg(
            *tiny_overrides(
                tiny_models["qwen3_moe"],
                "analysis.stages.int8_error.enabled=true",
                "analysis.stages.int8_error.max_batches=2",
                "analysis.batch_size=2",
            )
        ),
        tmp_path,
    )
    section = results["int8_error"]
    keep = sorted(r["feature_dim"] for r in results["systematic_outliers"])
    token_ids = np.load(tmp_path / "token_ids.npy")[:4]  # the first two batches of 2
    acts = full_activations(tiny_models["qwen3_moe"], decoder_module_paths(range(LAYERS)), token_ids, batch_size=2)
    all_err, kept_err = int8_recompute(acts, keep)
    assert section["tokens"] == 4 * 32
    assert section["relative_error_all_int8"] == pytest.approx(all_err, rel=1e-4)
    assert section["relative_error_outliers_kept"] == pytest.approx(kept_err, rel=1e-4)
    one = int8_recompute(acts[:, : 2 * 32], keep)  # what keeping only the first batch would give
    assert abs(section["relative_error_all_int8"] - one[0]) > 1e-4 * one[0]


def test_int8_error_drops_with_outliers_kept_and_equals_direct_computation(tiny_models, tmp_path):
    results = run(make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.stages.int8_error.enabled=true")), tmp_path)
    section = results["int8_error"]
    keep = sorted(r["feature_dim"] for r in results["systematic_outliers"])
    assert section["kept_dims"] == keep == [7, 21]
    token_ids = np.load(tmp_path / "token_ids.npy")[:4]  # the first batch (max_batches=1)
    acts = full_activations(tiny_models["olmoe"], decoder_module_paths(range(LAYERS)), token_ids, batch_size=4)
    all_err, kept_err = int8_recompute(acts, keep)
    assert section["relative_error_all_int8"] == pytest.approx(all_err, rel=1e-4)
    assert section["relative_error_outliers_kept"] == pytest.approx(kept_err, rel=1e-4)
    assert section["relative_error_outliers_kept"] < section["relative_error_all_int8"]
    m0 = section["modules"]["layer_0_ln_attn"]
    a0, k0 = int8_recompute(acts[:1], keep)
    assert m0["relative_error_all_int8"] == pytest.approx(a0, rel=1e-4) and m0[
        "relative_error_outliers_kept"
    ] == pytest.approx(k0, rel=1e-4)
    # what the W&B logger is given: the two overall errors, and one row per module from the section
    from types import SimpleNamespace

    from outlier_hydra.stages.int8_error import Int8Error

    stage = Int8Error(make_cfg("analysis.stages.int8_error.enabled=true").analysis.stages.int8_error)
    table = SimpleNamespace(Table=lambda columns, data: (columns, data))
    assert stage.tables(section, table) == {
        "int8/relative_error_all_int8": section["relative_error_all_int8"],
        "int8/relative_error_outliers_kept": section["relative_error_outliers_kept"],
        "int8_error/modules": (
            ["module", "relative_error_all_int8", "relative_error_outliers_kept"],
            [[n, e["relative_error_all_int8"], e["relative_error_outliers_kept"]] for n, e in section["modules"].items()],
        ),
    }
    assert list(section["modules"]) == [f"layer_{i}_ln_{p}" for i in range(LAYERS) for p in ("attn", "mlp")]


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("hunyuan_v1_moe", ()),
        ("llama4_text", ()),
        # the router stage alone: its own stop must carry the pass to the last layer's experts' input
        ("hunyuan_v1_moe", ("analysis.stages.experts.enabled=false",)),
        # and with the massive activations: the pass must then reach the last layer's output, past
        # the router stage's stop at the experts' input
        ("hunyuan_v1_moe", ("analysis.stages.experts.enabled=false", "analysis.stages.massive_activations.enabled=true")),
    ],
)
def test_choices_read_at_the_experts_or_taken_from_the_logits_equal_the_recomputation(model_type, extra, tmp_path):
    """HunYuan-MoE's router returns only its logits: the choices are read at the experts' input.
    Llama-4's experts are not given them: the top-k of the softmax of the logits. Every routing
    number against the recomputation (test_architectures.check_family)."""
    from test_architectures import check_family

    check_family(model_type, tmp_path, *extra)


@pytest.mark.parametrize(
    "family,extra",
    [
        ("olmoe", ()),
        ("qwen3_moe", ()),
        ("mixtral", ()),
        # the router stage alone: its own stop_after must carry the pass through the last router
        ("olmoe", ("analysis.stages.experts.enabled=false",)),
    ],
)
def test_every_routing_number_equals_an_independent_recomputation(family, extra, routed_models, tmp_path):
    """Per layer: tokens per expert, mean router entropy, mean top-1 share; per systematic feature and
    layer: outlier positions, top experts (choices, share, position share), entropy and top-1 share at
    those positions; and the experts over all layers. Counts and ratios of counts exactly; the router's
    float32 softmax to within 1e-5 relative or 1e-6 absolute (near-certain routing has entropy ~1e-6)."""
    from helpers import routing_expected, routing_tables

    results = run(make_cfg(*tiny_overrides(routed_models[family]), *extra), tmp_path)
    assert ("experts" in results) == (not extra)
    moe = results["moe_routing"]
    tables = routing_tables(routed_models[family], np.load(tmp_path / "token_ids.npy"), batch_size=4)
    for f in results["systematic_outliers"]:
        expected = routing_expected(tables, f["feature_dim"])
        for got, exp in zip(moe["layers"], expected["layers"], strict=True):
            assert got["tokens_per_expert"] == exp["tokens_per_expert"] and got["tokens"] == exp["tokens"]
            assert (got["layer"], got["magnitude_threshold"]) == (exp["layer"], 6.0)
            assert got["entropy_mean"] == pytest.approx(exp["entropy_mean"], rel=1e-5, abs=1e-6)
            assert got["top1_share_mean"] == pytest.approx(exp["top1_share_mean"], rel=1e-5, abs=1e-6)
        feature = next(x for x in moe["features"] if x["feature_dim"] == f["feature_dim"])
        assert feature["top_experts_all_layers"] == expected["feature"]["top_experts_all_layers"]  # exact ratios
        assert len(feature["layers"]) == len(expected["feature"]["layers"])
        for got, exp in zip(feature["layers"], expected["feature"]["layers"], strict=True):
            assert (got["layer"], got["outlier_positions"]) == (exp["layer"], exp["outlier_positions"])
            assert got["top_experts"] == exp["top_experts"]
            assert got["entropy_mean"] == pytest.approx(exp["entropy_mean"], rel=1e-5, abs=1e-6)
            assert got["top1_share_mean"] == pytest.approx(exp["top1_share_mean"], rel=1e-5, abs=1e-6)
    assert any(x["layers"] for x in moe["features"]), "some feature has outlier positions at an MLP input"


@pytest.mark.parametrize("model_type", ["olmoe", "hunyuan_v1_moe", "llama4_text"])
def test_the_choices_hook_hands_over_the_models_own_choices(model_type, tmp_path):
    """collect.hooks.choices_hook (what massive_routing reads) where the router returns the choices (OLMoE),
    where only the experts module is given them (HunYuan-MoE) and where no module is (Llama-4): per
    token, the same experts with the same weights as the plain hooks of the recomputation; and an
    experts module given them by keyword."""
    from helpers import module_input_tables
    from test_architectures import LAYOUTS, _expected
    from transformers import AutoModel

    from outlier_hydra.collect.hooks import attached, choices_hook
    from outlier_hydra.models import discover, probe
    from outlier_hydra.models.configs import config_top_k
    from outlier_hydra.testing.tiny import build

    folder = build(model_type, tmp_path / "model")
    model = AutoModel.from_pretrained(folder).eval()
    text = model.config.get_text_config()
    structure = discover(model, text.num_hidden_layers, text.hidden_size, None, "test")
    probe(structure, model, torch.device("cpu"), "test", config_top_k(text))
    _, moe = _expected(model, model_type, text.num_hidden_layers)
    assert model_type in LAYOUTS and moe
    got: dict = {i: [] for i in moe}
    hooks = [choices_hook(structure.moe(i), lambda idx, w, i=i: got[i].append((idx, w))) for i in moe]
    ids = np.random.default_rng(0).integers(1000, 20000, (4, 16))
    with attached(model, hooks), torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    _, tables = module_input_tables(folder, [], moe, ids, batch_size=4, top_k=config_top_k(text))
    for i in moe:
        (idx, w), k = got[i][0], tables[i]["idx"].shape[-1]
        weights = np.ones(idx.shape) if w is None else w.reshape(-1, k).double().numpy()
        mine = [dict(zip(r, v)) for r, v in zip(idx.reshape(-1, k).tolist(), weights.tolist())]
        want = [dict(zip(r, v)) for r, v in zip(tables[i]["idx"].tolist(), tables[i]["w"].tolist())]
        assert [sorted(m) for m in mine] == [sorted(m) for m in want], i
        assert all(m[e] == pytest.approx(v, rel=1e-6) for m, x in zip(mine, want) for e, v in x.items()), i
    from outlier_hydra.models.types import MoeLayer

    by_name = MoeLayer("b", "b.r", "b.e", 8, choices="experts", index_at="top_k_index", weights_at="top_k_weights")
    path, pre, kind = choices_hook(by_name, lambda idx, w: got.update(named=(idx, w)))
    index, weights = torch.tensor([[1, 3]]), torch.tensor([[0.7, 0.3]])
    pre(None, (torch.zeros(1, 64),), {"top_k_index": index, "top_k_weights": weights})
    assert (path, kind) == ("b.e", "pre") and got["named"][0] is not index
    assert torch.equal(got["named"][0], index) and torch.equal(got["named"][1], weights)


def test_a_stage_node_naming_no_stage_or_another_is_refused_naming_its_key():
    """The stage registry (stages/__init__.py) in-process: one message naming the key, for a name
    no stage has, a _target_ that is not a Stage, a Stage configured under another stage's name and a
    setting of the wrong type; a null node or enabled=false builds nothing."""
    from omegaconf import OmegaConf

    from outlier_hydra.errors import OutlierHydraError
    from outlier_hydra.stages import build_stages

    experts = dict(OmegaConf.to_container(make_cfg().analysis.stages.experts))
    cases = [
        (
            {"no_such": {"enabled": True}},
            "analysis.stages.no_such: no stage named 'no_such' (stages: experts, int8_error, massive_activations, "
            "massive_routing, moe_routing; a stage of your own needs _target_)",
        ),
        (
            {"probe": {"_target_": "outlier_hydra.stats.OutlierStats", "enabled": True}},
            "analysis.stages.probe._target_: outlier_hydra.stats.OutlierStats is not a Stage (outlier_hydra.stages.Stage)",
        ),
        (
            {"probe": {"_target_": "outlier_hydra.stages.experts.Experts", **experts}},
            "analysis.stages.probe: outlier_hydra.stages.experts.Experts is the stage 'experts'; configure it as "
            "analysis.stages.experts",
        ),
        ({"experts": {**experts, "top_units": "many"}}, "analysis.stages.experts.top_units: "),
    ]
    for node, message in cases:
        with pytest.raises(OutlierHydraError) as err:
            build_stages(OmegaConf.create(node), [])
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert build_stages(OmegaConf.create({"experts": None, "moe_routing": {"enabled": False}}), []) == []
    (stage,) = build_stages(OmegaConf.create({"experts": experts}), [])
    assert stage.name == "experts" and stage.config.top_units == experts["top_units"]


def test_router_and_massive_statistics_merge_field_by_field():
    """RouterStats.merge: every count and sum adds, per-feature rows joined by (layer row, dim) and
    sorted, layers must match. MassiveStats.merge: per layer the k largest |value| of both sides, on
    equal magnitude the earlier (sequence, position, dim), empty (NaN) rows last; histograms add."""
    from outlier_hydra.stages.massive_activations import MassiveStats
    from outlier_hydra.stages.moe_routing import RouterStats

    def router(layers, keys, seed):
        rng = np.random.default_rng(seed)
        n, e = len(keys), 3
        return RouterStats(
            layers=np.asarray(layers, np.int64),
            expert_counts=rng.integers(0, 9, (len(layers), e)),
            tokens=rng.integers(0, 9, len(layers)),
            entropy_sum=rng.random(len(layers)),
            top1_share_sum=rng.random(len(layers)),
            feat_keys=np.asarray(keys, np.int64).reshape(-1, 2),
            feat_counts=rng.integers(0, 9, (n, e)),
            feat_positions=rng.integers(0, 9, n),
            feat_entropy_sum=rng.random(n),
            feat_share_sum=rng.random(n),
        )

    a, b = router([1, 2], [(0, 7), (1, 3)], 0), router([1, 2], [(0, 2), (1, 3)], 1)
    m = a.merge(b)
    assert m.feat_keys.tolist() == [[0, 2], [0, 7], [1, 3]] and m.layers.tolist() == [1, 2]
    for k in ("expert_counts", "tokens", "entropy_sum", "top1_share_sum"):
        assert np.array_equal(getattr(m, k), getattr(a, k) + getattr(b, k)), k
    for k in ("feat_counts", "feat_positions", "feat_entropy_sum", "feat_share_sum"):
        want = [
            getattr(b, k)[0],
            getattr(a, k)[0],
            getattr(a, k)[1] + getattr(b, k)[1],
        ]
        assert np.array_equal(getattr(m, k), np.asarray(want)), k
        assert getattr(m, k).dtype == getattr(a, k).dtype, k
    with pytest.raises(ValueError) as err:
        a.merge(router([1, 3], [], 2))
    assert str(err.value) == "router statistics of different layers"

    nan = [np.nan] * 4
    top_a = np.asarray([[[900.0, 3, 5, 1], [-700.0, 0, 2, 4], nan]])
    top_b = np.asarray([[[-900.0, 1, 0, 0], [700.0, 0, 2, 3], nan]])
    hist_a, hist_b = np.arange(6).reshape(1, 6), np.ones((1, 6), np.int64)
    merged = MassiveStats(np.asarray([4]), hist_a, top_a).merge(MassiveStats(np.asarray([4]), hist_b, top_b))
    assert merged.top[0].tolist() == [[-900.0, 1, 0, 0], [900.0, 3, 5, 1], [700.0, 0, 2, 3]]
    assert merged.log_hist.tolist() == [[1, 2, 3, 4, 5, 6]] and merged.layers.tolist() == [4]
    # equal magnitude: the earlier sequence first, then the earlier position, then the lower dim
    ties_a = np.asarray([[[500.0, 1, 4, 0], [-500.0, 2, 0, 0], nan]])
    ties_b = np.asarray([[[500.0, 1, 2, 9], [500.0, 0, 5, 1], nan]])
    merged = MassiveStats(np.asarray([4]), hist_a, ties_a).merge(MassiveStats(np.asarray([4]), hist_b, ties_b))
    assert merged.top[0].tolist() == [[500.0, 0, 5, 1], [500.0, 1, 2, 9], [500.0, 1, 4, 0]]
    few = MassiveStats(np.asarray([4]), hist_a, np.asarray([[nan, nan, nan]]))
    assert np.array_equal(few.merge(MassiveStats(np.asarray([4]), hist_b, top_b)).top, top_b, equal_nan=True)


def test_int8_arithmetic_equals_a_float32_numpy_mirror_bit_for_bit():
    """absmax_int8 and squared_errors on rows of every magnitude (1e-3 to 1e3, a zero row, one with
    an outlier), against the same float32 steps in numpy (round half to even in both): quantized values
    bit for bit, the float64 sums of the float32 squared errors to 1e-12; a module whose inputs are all
    zero has error 0, not NaN."""
    from outlier_hydra.stages.int8_error import Int8Error, absmax_int8, squared_errors

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 32)) * np.asarray([1e-3, 0.05, 1.0, 30.0, 1e3, 0.0])[:, None]).astype(np.float32)
    x[2, 5] = 60.0  # an outlier in a row of unit scale

    def q(a):
        scale = np.maximum(np.abs(a).max(-1, keepdims=True), np.float32(1e-12)) / np.float32(127)
        return np.clip(np.round(a / scale), -127, 127) * scale

    assert np.array_equal(absmax_int8(torch.from_numpy(x)).numpy(), q(x))
    keep = [5, 9]
    rest = x.copy()
    rest[:, keep] = 0
    want = (
        ((x - q(x)) ** 2).astype(np.float64).sum(),
        ((rest - q(rest)) ** 2).astype(np.float64).sum()
        + ((x[:, keep] - x[:, keep].astype(np.float16).astype(np.float32)) ** 2).astype(np.float64).sum(),
        (x.astype(np.float64) ** 2).sum(),
    )
    got = squared_errors(torch.from_numpy(x), keep)
    assert got == pytest.approx(want, rel=1e-12)
    assert squared_errors(torch.from_numpy(x), [])[1] == pytest.approx(want[0], rel=1e-12)
    section = Int8Error.errors({"a": np.asarray(got), "zero": np.zeros(3)}, keep, 12)
    assert section["modules"]["zero"] == {"relative_error_all_int8": 0.0, "relative_error_outliers_kept": 0.0}
    assert section["relative_error_all_int8"] == np.sqrt(got[0] / got[2]) and section["tokens"] == 12
    assert section["kept_dims"] == keep and section["modules"]["a"]["relative_error_outliers_kept"] == np.sqrt(
        got[1] / got[2]
    )
    assert Int8Error.errors({"zero": np.zeros(3)}, [], 0)["relative_error_all_int8"] == 0.0


def test_massive_criteria_and_the_histogram_median_at_their_boundaries():
    """The median is the geometric centre of the histogram bin (0.1 decade wide, from 1e-6; the first
    bin holds everything below) where the cumulative count reaches half: an exact half stops at the
    lower bin. A value is massive when |value| is strictly above min_magnitude and strictly above
    min_ratio_to_median x the median; the report keeps the signed value, position and dim."""
    from outlier_hydra.stages import ReportContext
    from outlier_hydra.stages.massive_activations import MassiveActivations, MassiveStats

    bins = 120 + 2
    hist = np.zeros((3, bins), np.int64)
    hist[0, 61] = 10  # all in the bin [1e0, 1e0.1): centre 10**0.05
    hist[1, [41, 81]] = 5  # an exact half in the bin [1e-2, 1e-1.9): the lower one
    hist[2, 0] = 7  # everything below 1e-6
    centre = 10**0.05
    top = np.full((3, 4, 4), np.nan)
    top[0, :4] = [
        [-1000 * centre * (1 + 1e-15), 0, 3, 1],  # above both (by rounding's width)
        [1000 * centre, 1, 0, 2],  # exactly the ratio: not above it
        [100.0, 2, 5, 3],  # exactly min_magnitude
        [99.0, 4, 1, 4],  # sequence 4: past the 4 rows of token ids given
    ]
    top[1, 0] = [150.0, 0, 0, 0]  # median 10**-1.95: 150 is above both
    top[1, 1] = [100.0, 0, 1, 0]  # exactly min_magnitude: not above it, though far above the ratio
    stats = MassiveStats(np.asarray([0, 1, 2]), hist, top)
    assert stats.median(0) == pytest.approx(centre, rel=1e-12)
    assert stats.median(1) == pytest.approx(10**-1.95, rel=1e-12)
    assert stats.median(2) == 0.0
    cfg = make_cfg("analysis.stages.massive_activations.enabled=true").analysis.stages.massive_activations
    stage = MassiveActivations(cfg)  # min_magnitude 100, min_ratio_to_median 1000
    ids = np.arange(40).reshape(4, 10) + 100
    section = stage.report(stats, ReportContext(records=[], token_ids=ids, first_sequence=0))
    assert section["criteria"] == {"min_magnitude": 100.0, "min_ratio_to_median": 1000.0}
    first = section["layers"][0]
    assert first["median_abs"] == stats.median(0) and first["layer"] == 0
    assert [t["massive"] for t in first["top"]] == [True, False, False, False]
    assert first["massive"] == [first["top"][0]]
    assert first["top"][0] == {
        "value": top[0, 0, 0], "sequence": 0, "position": 3, "dim": 1, "token_id": int(ids[0, 3]), "massive": True,
    }  # fmt: skip
    assert [t.get("token_id") for t in first["top"]] == [ids[0, 3], ids[1, 0], ids[2, 5], None]
    assert [len(e["top"]) for e in section["layers"]] == [4, 2, 0]
    assert [t["massive"] for t in section["layers"][1]["top"]] == [True, False]
    later = stage.report(stats, ReportContext(records=[], token_ids=ids[2:], first_sequence=2))["layers"][0]["top"]
    assert ["token_id" in t for t in later] == [False, False, True, False] and later[2]["token_id"] == ids[2, 5]
    assert stage.rows({"layers": [{"layer": 7, "massive": [{"value": -2.0, "dim": 1, "sequence": 3, "position": 4}]}]}) == {
        "massive": (["layer", "value", "dim", "sequence", "position", "token"], [[7, -2.0, 1, 3, 4, ""]])
    }  # no tokenizer: an empty token


@pytest.mark.parametrize("model_type", ["falcon", "bloom"])
def test_massive_activations_of_layers_that_return_tuples(model_type, tmp_path):
    """Falcon's and BLOOM's layers return a tuple (hidden state first): the top values and their
    positions equal the residual stream read with plain forward hooks, a value set to inf in the
    stream (by a hook of the test) is never reported, and the largest finite values are."""
    from transformers import AutoModel

    from outlier_hydra.testing.tiny import build

    folder = build(model_type, tmp_path / "model", plant_dim=13)
    results = run(
        make_cfg(
            *tiny_overrides(
                folder, f"model.tokenizer={folder / 'tokenizer'}", "analysis.stages.massive_activations.enabled=true"
            )
        ),
        tmp_path / "run",
    )
    token_ids = np.load(tmp_path / "run" / "token_ids.npy")
    model = AutoModel.from_pretrained(folder).eval()
    layers = [m for n, m in model.named_modules() if n.count(".") == 1 and n.startswith("h.")]
    assert len(layers) == len(results["massive_activations"]["layers"]) == 4
    stream: dict = {i: [] for i in range(len(layers))}
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: stream[i].append(o[0].detach().double().numpy()))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for s in range(0, len(token_ids), 4):
            model(input_ids=torch.from_numpy(token_ids[s : s + 4]))
    for h in handles:
        h.remove()
    for entry in results["massive_activations"]["layers"]:
        x = np.concatenate(stream[entry["layer"]])
        largest = np.sort(np.abs(x).ravel())[::-1][: len(entry["top"])]
        assert [abs(t["value"]) for t in entry["top"]] == pytest.approx(largest.tolist(), rel=1e-6)
        for t in entry["top"]:
            assert t["value"] == pytest.approx(x[t["sequence"], t["position"], t["dim"]], rel=1e-6)

    # an inf in the stream: the stage takes it as 0 (like NaN), the next values come in its place
    from outlier_hydra.stages.massive_activations import MassiveActivations

    stage = MassiveActivations(
        make_cfg("analysis.stages.massive_activations.enabled=true").analysis.stages.massive_activations
    )
    stage.layers, stage.k = [0], 3
    stage.start_batch(first_sequence=2)
    out = torch.zeros(2, 3, 4)
    out[0, 1, 2], out[1, 2, 3], out[1, 0, 0], out[0, 0, 1] = float("inf"), -9.0, 7.0, float("nan")
    stage._hook(0)(None, (), (out, None))
    top = stage.finish_batch().top[0]
    assert top[:2].tolist() == [[-9.0, 3, 2, 3], [7.0, 3, 0, 0]] and top[2, 0] == 0.0


def test_massive_activations_hook_on_crafted_streams():
    """The hook and finish_batch on streams built by hand: the (sequence, position, dim) of a value
    beyond 2**24 elements into the batch is exact (integer division, not float32); zeros and values
    below 1e-6 fall in the first histogram bin and values above 1e6 in the last (none dropped), so
    the median follows them; counts are int64; a layer the forward did not reach stays empty."""
    from outlier_hydra.stages.massive_activations import MassiveActivations

    cfg = make_cfg("analysis.stages.massive_activations.enabled=true").analysis.stages.massive_activations
    stage = MassiveActivations(cfg)
    stage.layers, stage.k = [0, 1, 2], 2
    stage.start_batch(first_sequence=5)
    b, t, d = 2**21 + 16, 2, 4  # 2**24 + 128 elements
    big = torch.zeros(b, t, d)
    idx = 2**24 + 7  # past float32's integers: in float32 it would read as 2**24 + 8, another position
    big.view(-1)[idx] = -1000.0
    stage._hook(2)(None, (), big)
    mostly_zero = torch.zeros(1, 10, 1)
    mostly_zero[0, :4, 0] = 1.0
    stage._hook(0)(None, (), mostly_zero)
    stats = stage.finish_batch()
    assert stats.log_hist.dtype == np.int64 and stats.log_hist.sum(1).tolist() == [10, 0, b * t * d]
    assert stats.top[2, 0].tolist() == [-1000.0, 5 + idx // (t * d), (idx // d) % t, idx % d]
    assert np.isnan(stats.top[1]).all()  # layer 1: never reached
    assert stats.median(0) == 0.0 and stats.median(2) == 0.0
    stage.start_batch(first_sequence=0)
    huge = torch.full((1, 10, 1), 1e8)
    huge[0, :4, 0] = 1.0  # 6 of 10 above 1e6: the median is the last bin's centre
    stage._hook(0)(None, (), huge)
    stats = stage.finish_batch()
    assert stats.log_hist[0].sum() == 10 and stats.median(0) == pytest.approx(10**6.05, rel=1e-12)


def test_top_experts_by_choices_with_single_choices_and_ties():
    """_top: the k experts with most choices, ties by lower expert id, experts never chosen left out
    (one choice is still a choice); share of all choices and, given positions, position_share."""
    from outlier_hydra.stages.moe_routing import _top

    counts = np.asarray([0, 1, 5, 1, 0, 3])
    assert _top(counts, 3) == [
        {"expert": 2, "choices": 5, "share": 0.5},
        {"expert": 5, "choices": 3, "share": 0.3},
        {"expert": 1, "choices": 1, "share": 0.1},
    ]
    assert [t["expert"] for t in _top(counts, 10)] == [2, 5, 1, 3]
    assert _top(counts, 2, positions=4)[1] == {"expert": 5, "choices": 3, "share": 0.3, "position_share": 0.75}
    assert _top(np.zeros(4, np.int64), 3) == []


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_router_stage_at_its_edges_on_crafted_tensors(cpu_kernel, monkeypatch):
    """The stage's hooks fed by hand: an MLP input exactly at the threshold counts (inclusive, as the
    main statistics); router logits given as [batch, seq, experts]; choices without weights (each of
    the k choices weighs the same: top-1 share 1/k). Every field of its statistics against numpy.
    Both ways of finding the outlier positions: the CPU's C++ one, and the mask and matmul of a GPU."""
    from types import SimpleNamespace

    from outlier_hydra.collect import fused_cpu

    if not cpu_kernel:
        monkeypatch.setattr(fused_cpu, "available", lambda: False)

    from outlier_hydra.stages.moe_routing import MoeRouting

    stage = MoeRouting(make_cfg().analysis.stages.moe_routing)
    stage.layers, stage.row = [4], {4: 0}
    stage.start_batch(0)
    stage._mlp_input_hook(4)(torch.tensor([[[6.0, 5.999, -6.0], [0.0, 7.0, 0.0]]]))
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]]])
    stage._logits_hook(4, SimpleNamespace(logits_at=None))(None, (), logits)
    stage._choices_receiver(4)(torch.tensor([[1, 2], [2, 3]]), None)
    s = stage.finish_batch()
    p = np.exp(logits[0].double().numpy())
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    assert s.layers.tolist() == [4] and s.tokens.tolist() == [2]
    ints = ("layers", "expert_counts", "tokens", "feat_keys", "feat_counts", "feat_positions")
    assert {k: getattr(s, k).dtype for k in s.__dataclass_fields__} == {
        k: np.dtype(np.int64 if k in ints else np.float64) for k in s.__dataclass_fields__
    }
    assert s.expert_counts.tolist() == [[0, 1, 2, 1]]
    assert s.entropy_sum[0] == pytest.approx(entropy.sum(), rel=1e-6)
    assert s.top1_share_sum.tolist() == [1.0]  # 1/2 per token
    assert s.feat_keys.tolist() == [[0, 0], [0, 1], [0, 2]]  # dims 0 and 2 at token 0, dim 1 at token 1
    assert s.feat_counts.tolist() == [[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 0]]
    assert s.feat_positions.tolist() == [1, 1, 1]
    assert s.feat_entropy_sum == pytest.approx([entropy[0], entropy[1], entropy[0]], rel=1e-6)
    assert s.feat_share_sum.tolist() == [0.5, 0.5, 0.5]
    # with k = 3 weighted choices given as [batch, seq, k] (top-1 share 0.6 and 0.5), and the router
    # called twice in one pass (a module the model reuses): every sum twice over
    stage.start_batch(0)
    for _ in range(2):
        stage._mlp_input_hook(4)(torch.tensor([[[6.0, 5.999, -6.0], [0.0, 7.0, 0.0]]]))
        stage._logits_hook(4, SimpleNamespace(logits_at=None))(None, (), logits)
        stage._choices_receiver(4)(
            torch.tensor([[[1, 2, 0], [2, 3, 1]]]), torch.tensor([[[0.6, 0.2, 0.2], [0.25, 0.25, 0.5]]])
        )
    twice = stage.finish_batch()
    assert twice.tokens.tolist() == [4] and twice.expert_counts.tolist() == [[2, 4, 4, 2]]
    assert twice.top1_share_sum[0] == pytest.approx(2.2) and twice.entropy_sum[0] == pytest.approx(2 * entropy.sum())
    assert twice.feat_counts.tolist() == [[2, 2, 2, 0], [0, 2, 2, 2], [2, 2, 2, 0]]
    assert twice.feat_positions.tolist() == [2, 2, 2] and twice.feat_share_sum == pytest.approx([1.2, 1.0, 1.2])


def test_router_stage_reads_the_moe_blocks_input_where_the_probe_found_it():
    """The MoE block's hidden state is read from the argument the probe forward found it in: a keyword
    (a decoder layer calling `self.mlp(hidden_states=h)`) as well as a position; the other hooks go on
    the router and the choices."""
    from types import SimpleNamespace

    from outlier_hydra.stages.moe_routing import MoeRouting

    x = torch.tensor([[6.0, 0.0], [0.0, -7.0]])
    for inputs, args, kwargs in [({"layers.4.mlp": "hidden_states"}, (), {"hidden_states": x}), ({}, (x,), {})]:
        moe = SimpleNamespace(
            block="layers.4.mlp", router="layers.4.mlp.gate", experts="layers.4.mlp.experts", choices="experts", index_at=0
        )
        stage = MoeRouting(make_cfg().analysis.stages.moe_routing)
        stage.structure = SimpleNamespace(moe=lambda layer, moe=moe: moe, inputs=inputs)
        stage.layers, stage.row = [4], {4: 0}
        stage.start_batch(0)
        (path, pre, kind), (router, _), (choices, *_) = stage.hooks([4])
        assert (path, kind, router, choices) == ("layers.4.mlp", "pre", "layers.4.mlp.gate", "layers.4.mlp.experts")
        pre(None, args, kwargs)
        assert 4 in stage.pending_h


def test_router_means_of_a_layer_that_saw_one_token_are_that_tokens_values():
    """The per-layer means divide by the tokens seen, also when that is one token."""
    from types import SimpleNamespace

    from outlier_hydra.stages import ReportContext
    from outlier_hydra.stages.moe_routing import MoeRouting

    stage = MoeRouting(make_cfg().analysis.stages.moe_routing)
    stage.layers, stage.row = [2], {2: 0}
    stage.start_batch(0)
    stage._mlp_input_hook(2)(torch.tensor([[[0.0, 1.0]]]))
    logits = torch.tensor([[[0.0, 1.0, 2.0]]])
    stage._logits_hook(2, SimpleNamespace(logits_at=None))(None, (), logits)
    stage._choices_receiver(2)(torch.tensor([[2, 1]]), torch.tensor([[0.7, 0.3]]))
    [layer] = stage.report(stage.finish_batch(), ReportContext(records=[]))["layers"]
    p = np.exp(np.arange(3.0))
    p /= p.sum()
    assert layer["tokens"] == 1 and layer["tokens_per_expert"] == [0, 1, 1]
    assert layer["entropy_mean"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert layer["top1_share_mean"] == pytest.approx(0.7)


def test_router_report_keeps_the_top_experts_and_merges_no_features_as_integers():
    """Crafted router statistics: per feature and layer and over all layers only the configured top
    experts (3 of 4 chosen here), shares of all choices; the summary line's percentage; and two shards
    with no feature positions merge to empty integer arrays (as one job's would be)."""
    from outlier_hydra.stages import ReportContext
    from outlier_hydra.stages.moe_routing import MoeRouting, RouterStats

    def stats(keys, counts):
        k = len(keys)
        return RouterStats(
            layers=np.array([1]),
            expert_counts=np.array([[4, 4, 4, 8]]),
            tokens=np.array([5]),
            entropy_sum=np.array([1.0]),
            top1_share_sum=np.array([2.5]),
            feat_keys=np.asarray(keys, np.int64).reshape(-1, 2),
            feat_counts=np.asarray(counts, np.int64).reshape(-1, 4),
            feat_positions=np.full(k, 5, np.int64),
            feat_entropy_sum=np.full(k, 1.0),
            feat_share_sum=np.full(k, 2.5),
        )

    stage = MoeRouting(make_cfg().analysis.stages.moe_routing)
    section = stage.report(stats([[0, 9]], [[1, 1, 1, 7]]), ReportContext(records=[{"feature_dim": 9}]))
    [feature] = section["features"]
    assert [t["expert"] for t in feature["top_experts_all_layers"]] == [3, 0, 1]
    assert [t["share"] for t in feature["top_experts_all_layers"]] == [0.7, 0.1, 0.1]
    assert [t["position_share"] for t in feature["layers"][0]["top_experts"]] == [1.4, 0.2, 0.2]
    layer = feature["layers"][0]
    assert (layer["outlier_positions"], layer["entropy_mean"], layer["top1_share_mean"]) == (5, 1.0 / 5, 2.5 / 5)
    assert stage.summary(section) == [
        "dim 9: outlier positions go most to expert 3 (70% of their top-k choices, over 1 MoE layers)"
    ]
    merged = stats([], []).merge(stats([], []))
    assert merged.feat_keys.shape == (0, 2) and merged.feat_counts.shape == (0, 4)
    assert [a.dtype for a in (merged.feat_keys, merged.feat_counts, merged.feat_positions)] == [np.int64] * 3
    assert merged.tokens.tolist() == [10] and merged.expert_counts.tolist() == [[8, 8, 8, 16]]
