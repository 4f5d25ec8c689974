"""The collector on exact, hand-made activations: NaN/Inf, the threshold boundary, dtypes."""

import numpy as np
import pytest
import torch
from doubles import ReplayModel, structure_points

from outlier_hydra.analysis import SystematicOutlierAnalysis
from outlier_hydra.collect import OutlierCollector

# compiled: its own tests below (it compiles once per shape). triton: without a GPU in Triton's
# interpreter (conftest); on a GPU machine these CPU tensors cannot go to it, and the GPU tests
# (test_gpu_backends_match_the_reference) compare it with the reference there instead
BACKENDS = ["dense", "sparse", "fused"] + ([] if torch.cuda.is_available() else ["triton"])


def _collect(acts, threshold=6.0, chunk_layers=None, k=5, backend="dense"):
    model = ReplayModel(acts)
    points = ReplayModel.points(list(range(len(acts))))
    collector = OutlierCollector(threshold, k, chunk_layers, backend=backend)
    return collector.collect_batch(model, points, torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_are_counted_and_excluded(backend):
    a = torch.zeros(1, 10, 4)
    a[0, :3, 1] = float("nan")
    a[0, 3, 1] = float("inf")
    a[0, 4, 2] = -float("inf")
    a[0, 5, 2] = 7.0
    b = torch.zeros(1, 10, 4)
    stats = _collect([[a, b]], backend=backend)
    assert stats.nonfinite.tolist() == [5, 0]
    assert stats.occurrences()[0].tolist() == [0, 0, 1, 0]  # the Inf is not an outlier; the 7.0 is
    assert stats.max_abs[0].tolist() == [0, 0, 7.0, 0]
    assert np.isfinite(stats.top_values[~np.isnan(stats.top_values)]).all()
    result = SystematicOutlierAnalysis(6.0, 0.25, 0.06).analyze(stats)
    assert result["nonfinite_values"] == {"layer_0_ln_attn": 5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_is_inclusive_and_criteria_boundaries_are_exact(backend):
    # 4 modules; dim 0 reaches exactly 6.0 in exactly 1 module (25%) at 6 of 100 positions (6%)
    acts = [[torch.zeros(1, 100, 3) for _ in range(2)] for _ in range(2)]
    acts[1][0][0, :6, 0] = -6.0
    acts[0][1][0, :5, 1] = 6.0  # 5% of positions: not systematic
    acts[0][0][0, :50, 2] = np.nextafter(np.float32(6.0), np.float32(0)).item()  # just below 6.0
    stats = _collect(acts, backend=backend)
    assert stats.occurrences().sum(0).tolist() == [6, 5, 0]
    analysis = SystematicOutlierAnalysis(6.0, 0.25, 0.06)
    records = analysis.records(stats)
    assert [r["feature_dim"] for r in records] == [0]
    assert records[0]["layer_percentage"] == 0.25 and records[0]["seq_percentage"] == 0.06
    assert records[0]["example_values"] == [-6.0] * 5
    assert [r["feature_dim"] for r in SystematicOutlierAnalysis(6.0, 0.26, 0.06).records(stats)] == []
    assert [r["feature_dim"] for r in SystematicOutlierAnalysis(6.0, 0.25, 0.05).records(stats)] == [0, 1]


@pytest.mark.parametrize(
    "minimum,total", [(0.06, 100), (0.3, 10), (1e-12, 10**12), (0.1234567891, 10**10), (0.999999999999, 10**12)]
)
def test_criteria_compare_with_the_decimal_as_written(minimum, total):
    """count / total >= minimum at the boundary, for decimals of up to 12 digits: the count that meets
    it exactly meets it, one less does not, whatever the float's binary error."""
    from fractions import Fraction

    from outlier_hydra.analysis.criteria import meets

    at = Fraction(repr(minimum)) * total
    assert at.denominator == 1
    count = int(at)
    assert meets(np.asarray([count, count - 1]), total, minimum).tolist() == [True, False]
    assert meets(np.asarray([count]), total + 1, minimum).tolist() == [False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_hit_counts_a_position_once_across_modules_and_passes(backend):
    acts = [[torch.zeros(1, 8, 2) for _ in range(2)] for _ in range(3)]
    for layer in range(3):
        acts[layer][0][0, :4, 0] = 10.0  # the same 4 positions in three modules
    acts[2][1][0, 4, 0] = 10.0  # and one more position elsewhere
    for chunk in (None, 1, 2):
        stats = _collect(acts, chunk_layers=chunk, backend=backend)
        assert stats.positions_hit().tolist() == [5, 0]
        assert stats.occurrences()[:, 0].tolist() == [4, 0, 4, 0, 4, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_activations(backend):
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)) * 4
    f32 = _collect([[x, x]], backend=backend)
    bf16 = _collect([[x.bfloat16(), x.bfloat16()]], backend=backend)
    xb = x.bfloat16().float()
    assert bf16.occurrences().tolist() == (xb.abs() >= 6).reshape(-1, 8).sum(0).repeat(2, 1).tolist()
    assert np.array_equal(bf16.max_abs[0], xb.abs().reshape(-1, 8).amax(0).numpy())
    assert f32.num_tokens == bf16.num_tokens == 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threshold", [6.11, 0.8])
def test_edges_the_dtype_cannot_hold_are_compared_exactly(dtype, threshold):
    """An edge a half-precision tensor cannot hold (6.11, 0.8) is not rounded to it: x counts at an
    edge when x >= the edge as float32 holds it, in every reduction (a float16 0.7998 is below 0.8)."""
    x = torch.linspace(-1.0, 7.0, 2000).reshape(1, 400, 5).to(dtype)
    runs = {b: _collect([[x, x * 1.001]], threshold=threshold, backend=b) for b in BACKENDS}
    edge = float(np.float32(threshold))
    a = np.abs(torch.stack([x, x * 1.001]).double().numpy()).reshape(2, 400, 5)
    for backend, stats in runs.items():
        assert stats.occurrences(threshold).tolist() == (a >= edge).sum(1).tolist(), backend
        assert stats.positions_hit(threshold).tolist() == (a.max(0) >= edge).sum(0).tolist(), backend
        low = float(np.float32(stats.edges[0]))
        assert np.all(np.abs(stats.top_values[~np.isnan(stats.top_values)]) >= low), backend
        assert np.array_equal(stats.top_values, runs["dense"].top_values, equal_nan=True), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_points_of_different_dtypes(backend):
    """A model whose hooked tensors differ in dtype (float16, then float32; and the reverse): the
    position buffer widens to hold both exactly; the statistics of the float32 copies."""
    x = torch.randn(1, 300, 4, generator=torch.Generator().manual_seed(4)) * 4
    y = torch.randn(1, 300, 4, generator=torch.Generator().manual_seed(5)) * 4
    half = x.half()
    reference = _collect([[half.float(), y]], backend="dense")
    for acts in ([[half, y]], [[y, half]]):
        mixed = _collect(acts, backend=backend)
        ordered = reference if acts[0][0] is half else _collect([[y, half.float()]], backend="dense")
        _assert_identical(mixed, ordered)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, threshold", [(1.0, 6.0), (0.1, 0.6)], ids=["above-one", "below-one"])
def test_examples_take_the_largest_magnitudes_positive_first(backend, dtype, scale, threshold):
    """Of equal magnitudes the examples keep the positive values first (the order key's sign bit,
    int32 for 16-bit values), then the negative ones, for magnitudes below 1 too (threshold 0.6: the
    lowest edge 0.6); the examples recomputed with numpy: |v| desc, then v desc, over every position
    at or above the lowest edge, cut at num_examples."""
    column = [-8.0, 8.0, -8.0, -8.0, 7.0, -8.0, 8.0, -9.0, 3.0, -8.0, 8.0, -7.0]  # 12 positions
    x = torch.zeros(1, len(column), 2)
    x[0, :, 0] = torch.tensor(column) * scale
    x[0, :, 1] = -x[0, :, 0]  # the same magnitudes, the signs flipped
    x = x.to(dtype)
    stats = _collect([[x, torch.zeros_like(x)]], threshold=threshold, k=5, backend=backend)
    for dim in (0, 1):
        values = x[0, :, dim].float().numpy()
        want = sorted(values[np.abs(values) >= np.float32(stats.edges[0])], key=lambda v: (-abs(v), -v))[:5]
        assert stats.top_values[:, dim].tolist() == want, (backend, dtype, dim)
    nine, eight = float(x[0, 7, 0]), float(x[0, 1, 0])  # -9 and 8 (x scale, in the dtype)
    assert stats.top_values[:, 0].tolist() == [nine, eight, eight, eight, -eight]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_tokens_than_examples(backend):
    """A batch of 3 tokens with num_examples 5: 5 rows of examples per dim all the same, the missing
    ones NaN, as any other batch (so that batches merge)."""
    x = torch.zeros(1, 3, 2)
    x[0, :, 0] = torch.tensor([7.0, -9.0, 6.5])
    stats = _collect([[x, torch.zeros(1, 3, 2)]], k=5, backend=backend)
    assert stats.top_values.shape == (5, 2) and stats.top_values.dtype == np.float32
    assert stats.top_values[:3, 0].tolist() == [-9.0, 7.0, 6.5] and np.isnan(stats.top_values[3:, 0]).all()
    assert np.isnan(stats.top_values[:, 1]).all()


def test_the_analysis_reports_at_most_its_num_examples():
    """Statistics kept with 8 examples per dim: the analysis reports its own num_examples of them,
    largest |x| first (5 by default, as analysis.num_examples), at distinct positions."""
    x = torch.zeros(1, 10, 2)
    x[0, :, 1] = torch.tensor([6.0, -7.0, 8.0, -9.0, 10.0, -11.0, 12.0, -13.0, 14.0, -15.0])
    stats = _collect([[x, torch.zeros(1, 10, 2)]], k=8, backend="sparse")
    assert stats.top_values.shape == (8, 2)
    [default] = SystematicOutlierAnalysis(6.0, 0.5, 0.1).records(stats)
    assert default["feature_dim"] == 1 and default["example_values"] == [-15.0, 14.0, -13.0, 12.0, -11.0]
    [three] = SystematicOutlierAnalysis(6.0, 0.5, 0.1, num_examples=3).records(stats)
    assert three["example_values"] == [-15.0, 14.0, -13.0]


def test_systematic_dims_at_thresholds_other_than_the_collections():
    """The criteria applied at each threshold t of one collection (made for 6): a dim is systematic
    where >= 50% of the modules have a value >= t and >= 6% of the positions do, recomputed from the
    activations; one module with a single value >= t counts as a module hit."""
    x = torch.randn(1, 400, 6, generator=torch.Generator().manual_seed(1)) * 3
    y = x * 2
    x[0, 5, 4], y[0, :, 4] = 13.0, 0.0  # dim 4 at t = 12: one value in one module of two
    stats = _collect([[x, y]], backend="sparse")
    a = torch.stack([x, y]).abs().reshape(2, 400, 6)
    for t in (3.0, 4.0, 6.0, 8.0, 12.0, 16.0):
        want = [
            d
            for d in range(6)
            if int(((a[:, :, d] >= t).sum(1) > 0).sum()) / 2 >= 0.5 and int((a[:, :, d].amax(0) >= t).sum()) / 400 >= 0.0
        ]
        assert SystematicOutlierAnalysis(t, 0.5, 0.0).systematic_dims(stats).tolist() == want, t
        want_seq = [d for d in range(6) if int((a[:, :, d].amax(0) >= t).sum()) >= 0.06 * 400]
        assert SystematicOutlierAnalysis(t, 0.0, 0.06).systematic_dims(stats).tolist() == want_seq, t
    # the case discriminates: dim 4 at 12 by its single value; the seq criterion keeps five dims at 6
    # and one at 12 (a threshold left at the collection's 6 would keep the five)
    assert 4 in SystematicOutlierAnalysis(12.0, 0.5, 0.0).systematic_dims(stats)
    assert SystematicOutlierAnalysis(6.0, 0.0, 0.06).systematic_dims(stats).tolist() == [0, 1, 2, 3, 5]
    assert SystematicOutlierAnalysis(12.0, 0.0, 0.06).systematic_dims(stats).tolist() == [1]  # 25 of 400


def test_statistics_of_no_tokens_are_refused():
    stats = _collect([[torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)]])
    stats.num_tokens = 0
    with pytest.raises(ValueError, match="^statistics cover no tokens$"):
        SystematicOutlierAnalysis(6.0, 0.25, 0.06).systematic_dims(stats)


def test_threshold_sweep_from_one_collection_is_exact():
    x = torch.randn(1, 400, 6, generator=torch.Generator().manual_seed(1)) * 3
    stats = _collect([[x, x * 2]], backend="sparse")
    a = torch.stack([x, x * 2]).abs().reshape(2, 400, 6)
    for t in (3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 20.0):
        assert stats.occurrences(t).tolist() == (a >= t).sum(1).tolist()
        assert stats.positions_hit(t).tolist() == (a.amax(0) >= t).sum(0).tolist()
        # the analysis at t from statistics collected for 6: every field of every record at t
        for r in SystematicOutlierAnalysis(t, 0.0, 0.0, num_examples=3).records(stats):
            d = r["feature_dim"]
            hits = (a[:, :, d] >= t).sum(1)
            assert r["total_occurrences"] == int(hits.sum())
            assert r["layers_affected"] == [f"layer_0_ln_{k}" for k, h in zip(("attn", "mlp"), hits) if h]
            assert r["layer_percentage"] == int((hits > 0).sum()) / 2
            assert r["seq_percentage"] == int((a[:, :, d].amax(0) >= t).sum()) / 400
            assert all(abs(v) >= t for v in r["example_values"])
    from outlier_hydra.stats import ThresholdNotAnEdge

    with pytest.raises(ThresholdNotAnEdge) as err:
        stats.occurrences(6.5)
    assert str(err.value) == (
        "magnitude_threshold 6.5 is not a histogram edge of these statistics (edges: 3, 4, 5, 6, 7, 8, 10, 12, "
        "16, 20, 32, 64, 100, 1000); collect again with it in analysis.histogram_edges"
    )


def test_histogram_edges_are_sorted_float64_with_the_threshold_and_positive():
    from outlier_hydra.errors import OutlierHydraError
    from outlier_hydra.stats.outlier_stats import histogram_edges

    edges = histogram_edges([8, 3, 4, 3], 6)  # integers from a command line: still float64 edges
    assert edges.dtype == np.float64 and edges.tolist() == [3.0, 4.0, 6.0, 8.0]
    for bad, lowest in (([0.0, 3.0], "0.0"), ([-1.0, 3.0, 0.5], "-1.0")):
        with pytest.raises(OutlierHydraError) as err:
            OutlierCollector(6.0, histogram_edges=bad)
        assert str(err.value) == f"analysis.histogram_edges: histogram edges must be > 0, got {lowest}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_give_identical_statistics(dtype, tiny_models):
    """The sparse (CPU) and dense (reference) reductions agree exactly on a real tiny MoE."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["qwen3_moe"], dtype=dtype).eval()
    ids = torch.randint(1000, 20000, (2, 48), generator=torch.Generator().manual_seed(0))
    points = structure_points(model, [0, 1, 2, 3])
    results = [OutlierCollector(6.0, 5, None, backend=b).collect_batch(model, points, ids) for b in BACKENDS]
    assert [r.meta["backend"] for r in results] == BACKENDS, "each reduction ran, none fell back"
    for other in results[1:]:
        _assert_identical(results[0], other)
    assert results[0].occurrences().sum() > 0


def _assert_identical(a, b):
    for f in ("ge_counts", "pos_ge_counts", "max_abs", "nonfinite", "edges"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert np.array_equal(a.top_values, b.top_values, equal_nan=True)
    assert a.num_tokens == b.num_tokens


def test_compiled_backend_matches_the_reference(tiny_models):
    """torch.compile of the dense reduction (the GPU default; inductor's C++ backend here)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["olmoe"], dtype=torch.float32).eval()
    ids = torch.randint(1000, 20000, (2, 32), generator=torch.Generator().manual_seed(0))
    points = structure_points(model, [0, 1, 2, 3])
    compiled = OutlierCollector(6.0, 5, None, backend="compiled")
    reference = OutlierCollector(6.0, 5, None, backend="dense").collect_batch(model, points, ids)
    _assert_identical(compiled.collect_batch(model, points, ids), reference)
    assert compiled.backend == "compiled", "it compiled, rather than falling back"


def test_compiled_backend_falls_back_on_compilation_errors_only(monkeypatch):
    """A failure to compile switches to the dense reduction (recorded in the batch's meta); any other
    error inside a hook (an OOM, a bug) is raised, never swallowed by the fallback."""
    from torch._dynamo.exc import Unsupported

    import outlier_hydra.collect.backends as collector_module

    x = torch.randn(1, 50, 4, generator=torch.Generator().manual_seed(2)) * 4
    reference = _collect([[x, x]], backend="dense")

    def cannot_compile(*args):
        raise Unsupported("simulated: dynamo cannot trace this")

    monkeypatch.setattr(collector_module, "compiled_reduce", cannot_compile)
    model = ReplayModel([[x, x]])
    points = ReplayModel.points([0])
    collector = OutlierCollector(6.0, 5, None, backend="compiled")
    stats = collector.collect_batch(model, points, torch.zeros(1, 1, dtype=torch.long))
    _assert_identical(stats, reference)
    assert stats.meta["backend"] == "dense" and collector.backend == "dense"
    assert reference.meta["backend"] == "dense"

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(collector_module, "compiled_reduce", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        OutlierCollector(6.0, 5, None, backend="compiled").collect_batch(model, points, torch.zeros(1, 1, dtype=torch.long))


def test_chunks_group_whole_layers_in_model_order():
    """analysis.chunk_layers=N: consecutive groups of at most N analysed layers (both hook points of a
    layer in the same group); N >= the number of layers, 0 or null: one group. (On a CPU the groups
    change no number, so they are asserted here.)"""
    from outlier_hydra.collect.collector import layer_chunks
    from outlier_hydra.models.types import HookPoint

    points = [HookPoint(f"layer_{i}_ln_{k}", i, f"m{i}{k}") for i in (0, 2, 3, 5, 7) for k in ("attn", "mlp")]

    def layers_of(chunk):
        return [[p.layer for p in group] for group in layer_chunks(points, chunk)]

    assert layers_of(2) == [[0, 0, 2, 2], [3, 3, 5, 5], [7, 7]]
    assert layers_of(1) == [[i, i] for i in (0, 2, 3, 5, 7)]
    assert layers_of(4) == [[0, 0, 2, 2, 3, 3, 5, 5], [7, 7]]
    for whole in (5, 6, 0, None):
        assert layers_of(whole) == [[0, 0, 2, 2, 3, 3, 5, 5, 7, 7]]
    assert OutlierCollector(6.0, 5, 2).chunk_of_row(points) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_position_buffers_of_several_devices_combine_in_model_order():
    """A model split over devices (device_map) keeps one position buffer per device; at the end of
    the batch a later device's larger |x| replaces the earlier one's, equal ones keep the earlier
    (three "devices" here: cpu, cpu:0 and cpu:1 are distinct keys and need no GPU)."""
    from outlier_hydra.collect.backends import Dense, combined
    from outlier_hydra.collect.batch_state import BatchState
    from outlier_hydra.stats import DEFAULT_EDGES, histogram_edges

    state = BatchState(histogram_edges(DEFAULT_EDGES, 6.0), 5, 3, Dense())
    vals = [
        torch.tensor([[7.0, -3.0, 9.0, 1.0]]),
        torch.tensor([[-7.0, 4.0, 2.0, 0.5]]),
        torch.tensor([[8.0, -4.0, 1.0, 2.0]]),
    ]
    for dev, v in zip(["cpu", "cpu:0", "cpu:1"], vals):
        state.pabs[torch.device(dev)], state.pval[torch.device(dev)] = v.abs(), v
    pabs, pval = combined({dev: (state.pabs.get(dev), pval) for dev, pval in state.pval.items()})
    assert pval.tolist() == [[8.0, 4.0, 9.0, 2.0]]  # 7 then -7 (tie: 7 stays) then 8; 3 < 4 = -4 (tie: 4 stays)
    assert pabs.tolist() == [[8.0, 4.0, 9.0, 2.0]] and pabs.device == torch.device("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_whose_modules_did_not_all_run_is_refused_by_name(backend):
    """The end of a batch where no hooked module ran, or one of them did not, is an error naming it,
    not statistics with a module's rows left empty."""
    from outlier_hydra.collect import fused_cpu
    from outlier_hydra.collect.backends import BACKENDS as by_name
    from outlier_hydra.collect.batch_state import BatchState
    from outlier_hydra.stats import DEFAULT_EDGES, histogram_edges

    assert backend != "fused" or fused_cpu.available()  # (the collector builds or loads it before a pass)
    names = ["layer_0_ln_attn", "layer_0_ln_mlp"]
    state = BatchState(histogram_edges(DEFAULT_EDGES, 6.0), 5, 2, by_name[backend]())
    with pytest.raises(RuntimeError) as e:
        state.to_host(names, 6.0)
    assert str(e.value) == "no hooked module ran in the forward pass"
    state.update(0, torch.randn(4, 3))
    with pytest.raises(RuntimeError) as e:
        state.to_host(names, 6.0)
    assert str(e.value) == "hooked module layer_0_ln_mlp never ran in the forward pass"


def test_each_chunk_is_flushed_when_the_pass_reaches_the_next(monkeypatch):
    """Within the one pass, the counts of a finished group of layers are handed to the host when the
    first hook of the next group fires (on a GPU: pinned, non-blocking copies; a CPU has none to make)."""
    from outlier_hydra.collect.batch_state import BatchState

    calls = []
    monkeypatch.setattr(BatchState, "flush", lambda self, before: calls.append((before, self.ge.count(None))))
    acts = [[torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)] for _ in range(5)]
    for chunk, want in [(2, [(1, 6), (2, 2)]), (1, [(i, 10 - 2 * i) for i in range(1, 5)]), (None, []), (5, [])]:
        calls.clear()
        _collect(acts, chunk_layers=chunk)
        assert calls == want, chunk  # (the first group not yet flushed, hooks not yet fired)


def test_the_pass_stops_before_the_module_it_only_reads_the_input_of(tiny_models):
    """early_stop: a collection with no stage ends at the input of the last hooked module (the last
    layer's MLP block never runs); with early_stop=False the whole forward runs; the statistics agree."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["olmoe"], dtype=torch.float32).eval()
    ids = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(0))
    points = structure_points(model, [0, 1])
    ran = []
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(model.layers)]
    try:
        early = OutlierCollector(6.0).collect_batch(model, points, ids)
        assert ran == [0]  # layer 1's MLP input was read; the block itself never ran
        ran.clear()
        whole = OutlierCollector(6.0, early_stop=False).collect_batch(model, points, ids)
        assert ran == list(range(len(model.layers)))
    finally:
        for h in handles:
            h.remove()
    _assert_identical(early, whole)


@pytest.mark.parametrize("chunk_layers", [1, 2])
def test_chunked_statistics_come_from_one_forward_pass(chunk_layers):
    """chunk_layers bounds what lives on the device, not the number of passes: one forward per
    batch, and the statistics of an unchunked collection."""
    x = torch.randn(2, 30, 6, generator=torch.Generator().manual_seed(3)) * 4
    acts = [[x * (i + 1), -x] for i in range(3)]
    model = ReplayModel(acts)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    points = ReplayModel.points([0, 1, 2])
    chunked = OutlierCollector(6.0, 5, chunk_layers).collect_batch(model, points, torch.zeros(1, 1, dtype=torch.long))
    assert len(calls) == 1
    whole = OutlierCollector(6.0, 5, None).collect_batch(model, points, torch.zeros(1, 1, dtype=torch.long))
    _assert_identical(chunked, whole)
    assert chunked.occurrences().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_magnitudes_keep_the_earlier_module_and_positive_first(backend):
    # one position holds -7 in module 0 and +7 in module 1: its value is the earlier module's, -7
    a, b = torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)
    a[0, 0, 0], b[0, 0, 0] = -7.0, 7.0
    stats = _collect([[a, b]], k=1, backend=backend)
    assert stats.top_values[:, 0].tolist() == [-7.0]
    # the documented dtypes (stats/outlier_stats.py), whichever reduction made them
    assert (stats.top_values.dtype, stats.max_abs.dtype) == (np.float32, np.float32)
    assert stats.ge_counts.dtype == stats.pos_ge_counts.dtype == stats.nonfinite.dtype == np.int64
    assert stats.positions_hit().tolist() == [1, 0]
    # two positions of equal magnitude and opposite sign: the example is the positive one, also
    # below 1 (a threshold of 0.8 makes 0.8 the lowest edge)
    c = torch.zeros(1, 4, 2)
    c[0, 0, 1], c[0, 1, 1] = 0.8, -0.8
    model = ReplayModel([[c, torch.zeros(1, 4, 2)]])
    collector = OutlierCollector(0.8, 1, None, backend=backend)
    stats = collector.collect_batch(model, ReplayModel.points([0]), torch.zeros(1, 1, dtype=torch.long))
    assert stats.top_values[:, 1].tolist() == [np.float32(0.8)]


def test_documents_of_statistics_collected_at_another_threshold():
    from outlier_hydra.analysis.documents import build_documents

    x = torch.randn(1, 200, 6, generator=torch.Generator().manual_seed(2)) * 4
    stats = _collect([[x, x * 2]], backend="sparse")  # collected for 6
    analyzer = SystematicOutlierAnalysis(8.0, 0.25, 0.06)
    per_batch, final, total = build_documents(
        {"run": "r"}, analyzer, [stats], [], tokenizer=None, token_ids=None, first_sequence=0
    )
    assert total.threshold == 8.0 and np.array_equal(total.occurrences(), stats.occurrences(8.0))
    assert final["criteria"]["magnitude_threshold"] == 8.0 and final["run"] == "r"
    assert final["systematic_outliers"] == analyzer.analyze(stats, [stats])["systematic_outliers"]
    assert [d["systematic_outliers"] for d in per_batch] == [analyzer.analyze(stats, [stats])["systematic_outliers"]]


def test_the_reference_reductions_count_in_integers():
    """Counts stay exact past 2**24 per module and batch only as integers (float32 rounds there), so
    each reduction returns its counts as int64, whatever the activations' dtype."""
    from outlier_hydra.collect.reductions import dense_reduce, edges_on, sparse_reduce

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([[1.0, float("nan")], [7.0, float("inf")]], dtype=dtype)
        edges = edges_on((3.0, 6.0), x.device)
        for reduce in (dense_reduce, sparse_reduce):
            ge, amax, bad, _, _ = reduce(x, torch.zeros_like(x), torch.zeros_like(x), edges)
            assert (ge.dtype, bad.dtype) == (torch.int64, torch.int64), reduce.__name__
            assert ge.tolist() == [[1, 1], [0, 0]] and int(bad) == 2 and amax.tolist() == [7.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_the_model_calls_twice_in_a_pass_counts_both_calls(backend):
    """A hook point whose module runs twice in one forward (a module the model reuses): its outlier
    counts add over both calls and its maximum is the larger of the two; the positions of both count."""
    from doubles import ReplayModel

    class Twice(ReplayModel):
        def forward(self, input_ids):
            for layer, (attn, mlp) in zip(self.layers, self.acts):
                layer.self_attn(attn)
                layer.mlp(mlp)
                layer.mlp(-2 * mlp)

    x = torch.zeros(1, 6, 3)
    x[0, :, 0] = torch.tensor([1.0, 3.0, 3.5, 7.0, 0.0, -2.0])  # |x| >= 6 once; |2x| >= 6 three times
    x[0, 5, 2] = 4.0  # only the second call reaches 6 here
    model = Twice([[torch.zeros(1, 6, 3), x]])
    collector = OutlierCollector(6.0, 5, None, backend=backend, early_stop=False)
    stats = collector.collect_batch(model, ReplayModel.points([0]), torch.zeros(1, 1, dtype=torch.long))
    assert stats.occurrences().tolist() == [[0, 0, 0], [1 + 3, 0, 1]]
    assert stats.max_abs[1].tolist() == [14.0, 0.0, 8.0]
    assert stats.positions_hit().tolist() == [3, 0, 1]  # dim 0 at positions 1-3, dim 2 at 5
