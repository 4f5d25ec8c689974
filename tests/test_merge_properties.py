"""Property-based: statistics merged in any order and any grouping give the same result."""

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outlier_hydra.analysis import SystematicOutlierAnalysis
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.stats import DamagedStats, OutlierStats, merge_all

NAMES = ["layer_0_ln_attn", "layer_0_ln_mlp", "layer_1_ln_attn"]
D, K = 5, 3
EDGES = np.array([2.0, 6.0, 8.0])


@st.composite
def batch_stats(draw):
    n = draw(st.integers(1, 50))
    counts = st.lists(st.integers(0, n), min_size=len(EDGES), max_size=len(EDGES)).map(lambda c: sorted(c, reverse=True))
    ge = np.array(draw(st.lists(st.lists(counts, min_size=D, max_size=D), min_size=3, max_size=3)), np.int64)
    # values on a coarse grid so that ties (equal magnitudes, both signs) really happen
    vals = st.sampled_from([6.0, -6.0, 7.5, -7.5, 9.0, -9.0, 12.0])
    top = np.array(draw(st.lists(st.lists(vals, min_size=D, max_size=D), min_size=K, max_size=K)), np.float32)
    top = top[np.argsort(-np.abs(top), axis=0, kind="stable"), np.arange(D)]
    return OutlierStats(
        module_names=list(NAMES),
        edges=EDGES,
        threshold=6.0,
        num_tokens=n,
        ge_counts=ge,
        max_abs=np.abs(np.array(draw(st.lists(st.lists(vals, min_size=D, max_size=D), min_size=3, max_size=3)), np.float32)),
        top_values=top,
        pos_ge_counts=ge.max(0),
        nonfinite=np.array(draw(st.lists(st.integers(0, 3), min_size=3, max_size=3)), np.int64),
    )


def _same(a: OutlierStats, b: OutlierStats):
    assert (a.num_tokens, a.num_batches) == (b.num_tokens, b.num_batches)
    for f in ("ge_counts", "max_abs", "pos_ge_counts", "nonfinite"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert np.array_equal(a.top_values, b.top_values, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(batch_stats(), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_merge_is_independent_of_order_and_grouping(batches, rnd: random.Random):
    reference = merge_all(batches)
    shuffled = batches[:]
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(shuffled))
    left, right = shuffled[:cut], shuffled[cut:]
    parts = [merge_all(p) for p in (left, right) if p]
    _same(reference, merge_all(parts))
    analysis = SystematicOutlierAnalysis(6.0, 0.25, 0.06)
    assert analysis.analyze(reference) == analysis.analyze(merge_all(parts))


@settings(max_examples=30, deadline=None)
@given(batch_stats())
def test_save_load_round_trip(tmp_path_factory, stats):
    path = tmp_path_factory.mktemp("rt") / "s.npz"
    stats.meta, stats.num_batches = {"batch": 3, "sequences": [0, 7]}, 4
    path.write_bytes(stats.to_bytes())
    back = OutlierStats.load(path)
    _same(stats, back)
    assert (back.module_names, back.threshold, back.meta, back.extras) == (NAMES, 6.0, stats.meta, {})
    assert back.edges.tolist() == EDGES.tolist()
    for f in ("edges", "ge_counts", "pos_ge_counts", "max_abs", "top_values", "nonfinite"):
        assert getattr(back, f).dtype == getattr(stats, f).dtype, f


def _empty() -> OutlierStats:
    m = len(NAMES)
    return OutlierStats(
        module_names=list(NAMES),
        edges=EDGES,
        threshold=6.0,
        num_tokens=0,
        ge_counts=np.zeros((m, D, len(EDGES)), np.int64),
        pos_ge_counts=np.zeros((D, len(EDGES)), np.int64),
        max_abs=np.zeros((m, D), np.float32),
        top_values=np.full((K, D), np.nan, np.float32),
        nonfinite=np.zeros(m, np.int64),
        num_batches=0,
    )


def test_merge_with_empty_is_identity():
    s = _empty()
    s.num_tokens, s.num_batches = 10, 1
    s.ge_counts[1, 2] = [4, 3, 1]
    s.top_values[0, 2] = -9.0
    for merged in (_empty().merge(s), s.merge(_empty())):
        _same(merged, s)
        assert (merged.threshold, merged.module_names, merged.edges.tolist()) == (6.0, NAMES, EDGES.tolist())


def test_merged_statistics_equal_statistics_of_the_concatenated_data():
    """Ground truth, not just algebra: collecting batches A and B and merging them gives what one
    collection over A and B together gives (counts per module and per position, maxima, examples)."""
    import torch
    from doubles import ReplayModel

    from outlier_hydra.collect import OutlierCollector

    gen = torch.Generator().manual_seed(7)
    acts = [[torch.randn(5, 40, 6, generator=gen) * 3 for _ in range(2)] for _ in range(3)]  # 3 layers
    points = ReplayModel.points([0, 1, 2])
    ids = torch.zeros(1, 1, dtype=torch.long)

    def collect(rows):
        model = ReplayModel([[a[rows], m[rows]] for a, m in acts])
        return OutlierCollector(6.0, 4, None, backend="dense").collect_batch(model, points, ids)

    whole = collect(slice(0, 5))
    for cut in (1, 2, 4):
        merged = collect(slice(0, cut)).merge(collect(slice(cut, 5)))
        _same(merged.__class__(**{**merged.__dict__, "num_batches": 1}), whole)
    assert whole.pos_ge_counts[:, 1].sum() > 0 and whole.ge_counts.sum() > whole.pos_ge_counts.sum()


def test_a_file_with_a_pickled_array_is_refused_unread(tmp_path):
    path = tmp_path / "batch_000.npz"
    np.savez(path, meta=np.array([{"format_version": 4}], dtype=object))  # an object array: a pickle
    with pytest.raises(DamagedStats) as err:
        OutlierStats.load(path)
    assert str(err.value).startswith(f"{path}: damaged statistics file (ValueError: ")
    assert "allow_pickle" in str(err.value)


def test_damaged_or_foreign_files_are_refused_with_what_is_wrong(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a statistics file " * 4)
    with pytest.raises(DamagedStats) as err:
        OutlierStats.load(garbage)
    with pytest.raises(ValueError) as numpy_err:  # numpy's own words, cut to 80 characters
        np.load(garbage, allow_pickle=False)
    assert len(str(numpy_err.value)) > 80
    assert str(err.value) == f"{garbage}: damaged statistics file (ValueError: {str(numpy_err.value)[:80]})"

    # another format version: named with the one this version reads
    stats = _empty()
    path = tmp_path / "old.npz"
    path.write_bytes(stats.to_bytes())
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["format_version"] = 3
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(DamagedStats) as err:
        OutlierStats.load(path)
    assert str(err.value) == f"{path}: statistics format 3, this version reads 5"


class _Extra:
    """A stage's statistics as OutlierStats carries them: to_arrays / from_arrays."""

    def __init__(self, x):
        self.x = np.asarray(x)

    def to_arrays(self):
        return {"x": self.x}

    @classmethod
    def from_arrays(cls, arrays):
        return cls(arrays["x"])


def _arrays_and_meta(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(bytes(arrays.pop("meta")).decode())


def _rewrite(path, arrays, meta):
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def test_a_changed_file_or_an_unconfigured_stage_is_refused(tmp_path):
    stats = _empty()
    stats.extras = {"probe": _Extra([1.5, 2.5])}
    path = tmp_path / "s.npz"
    path.write_bytes(stats.to_bytes())
    for configured, listed in (({}, "none"), ({"other": _Extra, "zeta": _Extra}, "other, zeta")):
        with pytest.raises(OutlierHydraError) as err:
            OutlierStats.load(path, configured)
        assert (
            str(err.value)
            == f"{path}: holds statistics of the stage 'probe', which is not configured (configured: {listed})"
        )
    assert OutlierStats.load(path, {"probe": _Extra}).extras["probe"].x.tolist() == [1.5, 2.5]

    arrays, meta = _arrays_and_meta(path)
    del meta["extras"], meta["meta"]  # a file that names no stage carries none; provenance is optional
    _rewrite(path, arrays, meta)
    assert (OutlierStats.load(path).extras, OutlierStats.load(path).meta) == ({}, {})
    arrays["max_abs"][0, 0] = 1.0  # one value changed after writing
    _rewrite(path, arrays, meta)
    with pytest.raises(DamagedStats) as err:
        OutlierStats.load(path, {"probe": _Extra})
    assert str(err.value) == f"{path}: checksum mismatch, the file changed after it was written"


def test_counts_are_stored_as_int32_while_they_fit_and_read_back_exactly(tmp_path):
    stats = _empty()
    stats.num_tokens, stats.ge_counts[0, 0, 0] = 2**31 - 1, 2**31 - 1
    path = tmp_path / "small.npz"
    path.write_bytes(stats.to_bytes())
    arrays, _ = _arrays_and_meta(path)
    assert arrays["ge_counts"].dtype == arrays["pos_ge_counts"].dtype == np.int32
    back = OutlierStats.load(path)
    assert back.ge_counts.dtype == np.int64 and back.ge_counts[0, 0, 0] == 2**31 - 1
    stats.num_tokens, stats.ge_counts[0, 0, 0], stats.pos_ge_counts[0, 0] = 2**31, 2**31, 2**31
    path.write_bytes(stats.to_bytes())
    arrays, _ = _arrays_and_meta(path)
    assert arrays["ge_counts"].dtype == arrays["pos_ge_counts"].dtype == np.int64
    back = OutlierStats.load(path)
    assert back.ge_counts[0, 0, 0] == back.pos_ge_counts[0, 0] == 2**31 and back.num_tokens == 2**31


def test_statistics_of_other_modules_edges_or_shapes_are_not_merged():
    other_modules, other_edges, other_shape = _empty(), _empty(), _empty()
    other_modules.module_names = [*NAMES[:2], "layer_1_ln_mlp"]
    other_edges.edges = np.array([2.0, 6.0, 9.0])
    other_shape.top_values = np.full((K + 1, D), np.nan, np.float32)
    other_width = _empty()
    other_width.max_abs = np.zeros((len(NAMES), D + 1), np.float32)
    for other, why in (
        (other_width, "cannot merge statistics of different shapes"),
        (other_modules, "cannot merge statistics of different hooked modules"),
        (other_edges, "cannot merge statistics with different histogram edges"),
        (other_shape, "cannot merge statistics of different shapes"),
    ):
        for a, b in ((_empty(), other), (other, _empty())):
            with pytest.raises(ValueError) as err:
                a.merge(b)
            assert str(err.value) == why
    with_stage = _empty()
    with_stage.extras = {"probe": _Extra([1.0])}
    with pytest.raises(ValueError) as err:
        _empty().merge(with_stage)
    assert str(err.value) == "cannot merge statistics of different stages ([] vs ['probe'])"
    with pytest.raises(ValueError) as err:
        merge_all([])
    assert str(err.value) == "no statistics to merge"
    assert merge_all([with_stage]) is with_stage


def test_the_collector_section_names_the_reductions_of_the_batches():
    from outlier_hydra.analysis.documents import collector_section

    sparse, dense, unnamed = _empty(), _empty(), _empty()
    sparse.meta, dense.meta = {"backend": "sparse"}, {"backend": "dense"}
    assert collector_section([sparse, sparse]) == {"backend": "sparse"}
    assert collector_section([sparse, dense, sparse]) == {"backend": ["dense", "sparse"]}
    assert collector_section([unnamed]) == {"backend": "unknown"}  # statistics written without it
