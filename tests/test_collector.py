"""The collector on exact, hand-made activations: NaN/Inf, the threshold boundary, dtypes."""

import numpy as np
import torch
from helpers import ReplayModel

from outlier_hydra.analysis import SystematicOutlierAnalysis
from outlier_hydra.collect import OutlierCollector
from outlier_hydra.models.adapters import PRE_NORM_DECODER


def _collect(acts, threshold=6.0, chunk_layers=None, k=5):
    model = ReplayModel(acts)
    points = PRE_NORM_DECODER.hook_points(list(range(len(acts))))
    return OutlierCollector(threshold, k, chunk_layers).collect_batch(model, points, torch.zeros(1, 1, dtype=torch.long))


def test_nan_and_inf_are_counted_and_excluded():
    a = torch.zeros(1, 10, 4)
    a[0, :3, 1] = float("nan")
    a[0, 3, 1] = float("inf")
    a[0, 4, 2] = -float("inf")
    a[0, 5, 2] = 7.0
    b = torch.zeros(1, 10, 4)
    stats = _collect([[a, b]])
    assert stats.nonfinite.tolist() == [5, 0]
    assert stats.occurrences[0].tolist() == [0, 0, 1, 0]  # the Inf is not an outlier; the 7.0 is
    assert stats.max_abs[0].tolist() == [0, 0, 7.0, 0]
    assert np.isfinite(stats.top_values[~np.isnan(stats.top_values)]).all()
    result = SystematicOutlierAnalysis(6.0, 0.25, 0.06).analyze(stats)
    assert result["nonfinite_values"] == {"layer_0_ln_attn": 5}


def test_threshold_is_inclusive_and_criteria_boundaries_are_exact():
    # 4 modules; dim 0 reaches exactly 6.0 in exactly 1 module (25%) at 6 of 100 positions (6%)
    acts = [[torch.zeros(1, 100, 3) for _ in range(2)] for _ in range(2)]
    acts[1][0][0, :6, 0] = -6.0
    acts[0][1][0, :5, 1] = 6.0  # 5% of positions: not systematic
    acts[0][0][0, :50, 2] = np.nextafter(np.float32(6.0), np.float32(0)).item()  # just below 6.0
    stats = _collect(acts)
    assert stats.occurrences.sum(0).tolist() == [6, 5, 0]
    analysis = SystematicOutlierAnalysis(6.0, 0.25, 0.06)
    records = analysis.records(stats)
    assert [r["feature_dim"] for r in records] == [0]
    assert records[0]["layer_percentage"] == 0.25 and records[0]["seq_percentage"] == 0.06
    assert records[0]["example_values"] == [-6.0] * 5
    assert [r["feature_dim"] for r in SystematicOutlierAnalysis(6.0, 0.26, 0.06).records(stats)] == []
    assert [r["feature_dim"] for r in SystematicOutlierAnalysis(6.0, 0.25, 0.05).records(stats)] == [0, 1]


def test_positions_hit_counts_a_position_once_across_modules_and_passes():
    acts = [[torch.zeros(1, 8, 2) for _ in range(2)] for _ in range(3)]
    for layer in range(3):
        acts[layer][0][0, :4, 0] = 10.0  # the same 4 positions in three modules
    acts[2][1][0, 4, 0] = 10.0  # and one more position elsewhere
    for chunk in (None, 1, 2):
        stats = _collect(acts, chunk_layers=chunk)
        assert stats.positions_hit.tolist() == [5, 0]
        assert stats.occurrences[:, 0].tolist() == [4, 0, 4, 0, 4, 1]


def test_bfloat16_activations():
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)) * 4
    f32 = _collect([[x, x]])
    bf16 = _collect([[x.bfloat16(), x.bfloat16()]])
    xb = x.bfloat16().float()
    assert bf16.occurrences.tolist() == (xb.abs() >= 6).reshape(-1, 8).sum(0).repeat(2, 1).tolist()
    assert np.array_equal(bf16.max_abs[0], xb.abs().reshape(-1, 8).amax(0).numpy())
    assert f32.num_tokens == bf16.num_tokens == 32
