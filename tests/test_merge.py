"""Statistics merge exactly: batch size does not change the results, and merging shard runs equals
one run over all their sequences."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_cfg, tiny_overrides

from outlier_hydra.pipeline import run
from outlier_hydra.stages.experts import ExpertStats
from outlier_hydra.stages.moe_routing import RouterStats
from outlier_hydra.stats import OutlierStats
from outlier_hydra.tools.merge import merge_runs

STAGE_STATS = {"moe_routing": RouterStats, "experts": ExpertStats}
COMPARED = ("num_tokens", "num_hooked_modules", "hooked_modules", "criteria")


def _without_batches(records):
    return [{k: v for k, v in r.items() if k != "batches_systematic"} for r in records]


def test_batch_size_does_not_change_results(tiny_models, tmp_path):
    one = run(make_cfg(*tiny_overrides(tiny_models["mixtral"], "analysis.batch_size=1")), tmp_path / "bs1")
    four = run(make_cfg(*tiny_overrides(tiny_models["mixtral"], "analysis.batch_size=4")), tmp_path / "bs4")
    assert (one["num_batches"], four["num_batches"]) == (8, 2)
    for key in COMPARED:
        assert one[key] == four[key]
    a, b = _without_batches(one["systematic_outliers"]), _without_batches(four["systematic_outliers"])
    assert {r["feature_dim"] for r in a} == {r["feature_dim"] for r in b} == {7, 21}
    for ra, rb in zip(sorted(a, key=lambda r: r["feature_dim"]), sorted(b, key=lambda r: r["feature_dim"])):
        for key in ("feature_dim", "layer_percentage", "seq_percentage", "total_occurrences", "layers_affected"):
            assert ra[key] == rb[key]
        # a batch of 1 and a batch of 4 run different matmul shapes: floats agree to rounding
        assert ra["max_magnitude"] == pytest.approx(rb["max_magnitude"], rel=1e-5)
        assert np.allclose(ra["example_values"], rb["example_values"], rtol=1e-5)


def test_shards_merge_to_the_single_run(tiny_models, tmp_path):
    single = run(make_cfg(*tiny_overrides(tiny_models["olmoe"], "analysis.batch_size=2")), tmp_path / "all")
    shards = []
    for i in range(2):
        d = tmp_path / f"shard{i}"
        run(
            make_cfg(
                *tiny_overrides(
                    tiny_models["olmoe"],
                    "analysis.batch_size=2",
                    "dataset.num_sequences=4",
                    f"dataset.skip_sequences={4 * i}",
                )
            ),
            d,
        )
        shards.append(d)
    # through the command line, as a user would
    subprocess.run(
        [sys.executable, "-m", "outlier_hydra", "merge", *map(str, shards), "--out", str(tmp_path / "merged")],
        check=True,
        capture_output=True,
    )
    for name in ["final_analysis_results.json"] + [f"batch_{b:03d}_results.json" for b in range(1, 5)]:
        merged = json.loads((tmp_path / "merged" / name).read_text())
        assert merged == json.loads((tmp_path / "all" / name).read_text()), name  # identical, batches_systematic too
    a = OutlierStats.load(tmp_path / "all" / "statistics.npz", STAGE_STATS)
    b = OutlierStats.load(tmp_path / "merged" / "statistics.npz", STAGE_STATS)
    for f in ("ge_counts", "pos_ge_counts", "max_abs", "top_values", "nonfinite"):
        assert np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True)
    assert single["num_systematic_outliers"] == 2


def test_merge_refuses_overlapping_or_foreign_runs(tiny_models, tmp_path):
    from outlier_hydra.errors import OutlierHydraError

    base = tiny_overrides(tiny_models["olmoe"], "dataset.num_sequences=4")
    run(make_cfg(*base), tmp_path / "a")
    run(make_cfg(*base, "dataset.skip_sequences=2"), tmp_path / "b")
    with pytest.raises(OutlierHydraError, match="overlapping sequences"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    run(make_cfg(*base, "dataset.skip_sequences=4", "analysis.magnitude_threshold=5"), tmp_path / "c")
    with pytest.raises(OutlierHydraError, match="analysis.magnitude_threshold"):
        merge_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
