"""The experts stage: planted super experts and super weights found exactly, every per-expert number
against a plain per-expert loop over the routing, under each experts implementation, the model's
output untouched, and the super-expert constants changed by reanalyze without the model."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_cfg, tiny_overrides

from outlier_hydra.pipeline import run

PLANTED = {"olmoe": (2, 5), "qwen3_moe": (1, 3), "mixtral": (3, 0)}  # (layer, expert)


def _build(family, folder, super_expert=None, super_weight=None, plant_dim=None):
    """A tiny model (tiny.py) with, optionally, one expert's down_proj scaled x3000 and one
    down_proj weight set to 40: (layer, expert, row, col), expert None for a dense MLP."""
    from transformers import AutoModel

    from outlier_hydra.testing.tiny import build

    build(family, folder, plant_dim=plant_dim)
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        if super_expert is not None:
            layer, e = super_expert
            model.layers[layer].mlp.experts.down_proj[e] *= 3000.0
        if super_weight is not None:
            layer, e, row, col = super_weight
            if e is None:
                model.layers[layer].mlp.down_proj.weight[row, col] = 40.0
            else:
                model.layers[layer].mlp.experts.down_proj[e, row, col] = 40.0
    model.save_pretrained(folder)
    return folder


def _run(folder, tmp_path, *extra, name="run"):
    return run(make_cfg(*tiny_overrides(folder, f"model.tokenizer={folder / 'tokenizer'}", *extra)), tmp_path / name)


def per_expert_loop(folder, token_ids, batch_size, threshold=6.0):
    """Independent: for each MoE layer, the experts module's inputs from a plain pre-hook, then each
    expert's down_proj input h and output y by a Python loop over the experts (the module's own
    act_fn and weight banks, F.linear): {layer: {expert: (tokens, max|y|, dim, max|h|, channel, counts)}}."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    calls = {}
    handles = []
    for i, layer in enumerate(model.layers):
        experts = layer.mlp.experts

        def grab(m, args, kwargs, i=i):
            calls.setdefault(i, []).append((args[0].detach().clone(), args[1].detach().clone()))

        handles.append(experts.register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        for s in range(0, len(token_ids), batch_size):
            model(input_ids=torch.from_numpy(token_ids[s : s + batch_size]))
    for h in handles:
        h.remove()
    out = {}
    torch.set_grad_enabled(False)
    for i, batches in calls.items():
        ex = model.layers[i].mlp.experts
        n_exp = ex.down_proj.shape[0]
        per = {}
        for e in range(n_exp):
            h, y, rows = expert_rows(ex, batches, e)
            h, y = h.double().numpy(), y.double().numpy()
            if len(y) == 0:
                per[e] = (0, None, None, None, None, np.zeros(y.shape[1], np.int64), [])
                continue
            ay, ah = np.abs(y), np.abs(h)
            # global token index of each row: batch b's rows are its flattened [batch, length] tokens
            token = np.concatenate([b * len(x) + r.numpy() for b, ((x, _), r) in enumerate(zip(batches, rows))])
            top = sorted(zip(-ay.max(1), token, ay.argmax(1)))[:5]  # largest row max first, then the earlier token
            per[e] = (
                len(y),
                ay.max(),
                int(ay.max(0).argmax()),
                ah.max(),
                int(ah.max(0).argmax()),
                (ay >= threshold).sum(0),
                [(-v, int(t), int(d)) for v, t, d in top],
            )
        out[i] = per
    torch.set_grad_enabled(True)
    return out


def expert_rows(ex, calls, e):
    """Expert e of a fused experts module over recorded calls (hidden [N, H], choices [N, k]): its
    down_proj inputs h and outputs y by F.linear on its own weights, and per call the rows it took."""
    hs, ys, rows = [], [], []
    for x, idx in calls:
        rows.append((idx == e).any(-1).nonzero()[:, 0])
        gate, up = torch.nn.functional.linear(x[rows[-1]], ex.gate_up_proj[e]).chunk(2, dim=-1)
        hs.append(ex.act_fn(gate) * up)
        ys.append(torch.nn.functional.linear(hs[-1], ex.down_proj[e]))
    return torch.cat(hs), torch.cat(ys), rows


@pytest.mark.parametrize("family", sorted(PLANTED))
def test_planted_super_expert_and_every_expert_against_a_plain_loop(family, tmp_path):
    layer, expert = PLANTED[family]
    folder = _build(family, tmp_path / "model", super_expert=(layer, expert))
    results = _run(folder, tmp_path, "plots=true")
    section = results["experts"]
    assert [(s["layer"], s["expert"]) for s in section["super_experts"]] == [(layer, expert)]
    assert (tmp_path / "run" / "plots" / "expert_max_output.png").stat().st_size > 0
    ids = np.load(tmp_path / "run" / "token_ids.npy")
    expected = per_expert_loop(folder, ids, batch_size=4)
    units = {(u["layer"], u["expert"]): u for u in section["units"] if u["kind"] == "routed"}
    assert set(units) == {(i, e) for i, per in expected.items() for e in per}
    for i, per in expected.items():
        for e, (tokens, y_max, dim, h_max, channel, counts, top_rows) in per.items():
            u = units[(i, e)]
            assert u["tokens"] == tokens, (i, e)
            if tokens == 0:
                assert u["max_output"] is None and "top_outputs" not in u
                continue
            got = [(t["value"], t["token_index"], t["dim"]) for t in u["top_outputs"]]
            assert [g[1:] for g in got] == [w[1:] for w in top_rows], (i, e)
            assert [g[0] for g in got] == pytest.approx([w[0] for w in top_rows], rel=1e-5), (i, e)
            assert got[0][0] == u["max_output"] and got[0][1] == u["max_output_at"]["token_index"]
            assert [t["token_id"] for t in u["top_outputs"]] == [int(ids.reshape(-1)[w[1]]) for w in top_rows]
            # grouped_mm and F.linear sum in different orders: float32 rounding apart
            assert u["max_output"] == pytest.approx(y_max, rel=1e-5), (i, e)
            assert u["max_output_dim"] == dim and u["max_input_channel"] == channel, (i, e)
            assert u["max_input"] == pytest.approx(h_max, rel=1e-5), (i, e)
            top = sorted(((int(c), d) for d, c in enumerate(counts) if c), key=lambda t: (-t[0], t[1]))[:5]
            assert [(o["count"], o["dim"]) for o in u["outlier_dims"]] == top, (i, e)
    assert units[(layer, expert)]["outlier_dims"], "the planted expert's outputs reach the threshold"
    assert any(line.startswith("super experts: layer") for line in _summary(results))


def _summary(results):
    from outlier_hydra.stages.experts import Experts

    return Experts(make_cfg().analysis.stages.experts).summary(results["experts"])


@pytest.mark.parametrize("family,impl", [("olmoe", "eager"), ("olmoe", "batched_mm"), ("gpt_oss", "eager")])
def test_every_experts_implementation_gives_the_same_statistics(family, impl, tmp_path):
    """grouped_mm (the CPU default), eager (F.linear on an expert's slice; gpt-oss: `h @ W[e]`, a matmul,
    on its transposed bank) and batched_mm: the same tokens, dims, channels, counts, positions and
    super-weight candidates; maxima and contributions to float32 rounding (the matmuls differ)."""
    folder = _build(family, tmp_path / "model", super_expert=(2, 5))
    grouped = _run(folder, tmp_path, name="grouped")["experts"]
    config = json.loads((folder / "config.json").read_text())
    config["experts_implementation"] = impl
    (folder / "config.json").write_text(json.dumps(config))
    other = _run(folder, tmp_path, name=impl)["experts"]
    _same_units(grouped, other, rel=1e-5)


def _same_units(a_section, b_section, rel):
    """Two experts sections of one model and tokens: the same units, tokens, dims, channels, counts,
    positions and super-weight candidates; maxima and contributions within `rel`."""
    for a, b in zip(a_section["units"], b_section["units"], strict=True):
        for key in ("layer", "expert", "tokens", "max_output_dim", "max_input_channel", "outlier_dims"):
            assert a[key] == b[key], (key, a["layer"], a["expert"])
        if a["max_output"] is not None:
            assert a["max_output"] == pytest.approx(b["max_output"], rel=rel)
            assert a["max_input"] == pytest.approx(b["max_input"], rel=rel)
            assert a["max_output_at"] == b["max_output_at"]
            ca, cb = a["super_weight_candidate"], b["super_weight_candidate"]
            assert {k: ca[k] for k in ("row", "col", "weight")} == {k: cb[k] for k in ("row", "col", "weight")}
            assert ca["contribution"] == pytest.approx(cb["contribution"], rel=rel)
        else:
            assert b["max_output"] is None and "max_output_at" not in b
    assert len(a_section["units"]) == 4 * 8
    assert a_section["super_experts"][0]["expert"] == b_section["super_experts"][0]["expert"] == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU path is checked on one)")
def test_a_run_on_cuda_gives_the_cpu_statistics(tmp_path):
    """The whole run on the GPU (its default experts implementation, the compiled reduction, float32)
    against the same run on the CPU: the systematic features and the routing equal, the experts
    statistics to float32 rounding (the GPU's matmuls sum in another order)."""
    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5), plant_dim=13)
    cpu = _run(folder, tmp_path, name="cpu")
    gpu = _run(folder, tmp_path, "model.device_map=cuda", name="cuda")
    _same_units(cpu["experts"], gpu["experts"], rel=1e-4)
    exact = ("feature_dim", "layer_percentage", "seq_percentage", "total_occurrences", "layers_affected")
    assert [f["feature_dim"] for f in gpu["systematic_outliers"]] == [13]
    for a, b in zip(cpu["systematic_outliers"], gpu["systematic_outliers"], strict=True):
        assert {k: a[k] for k in exact} == {k: b[k] for k in exact}
        assert a["max_magnitude"] == pytest.approx(b["max_magnitude"], rel=1e-4)
    for a, b in zip(cpu["moe_routing"]["layers"], gpu["moe_routing"]["layers"], strict=True):
        assert a["tokens_per_expert"] == b["tokens_per_expert"]


@pytest.mark.parametrize("where", ["dense", "expert"])
def test_planted_super_weight_found_at_its_row_and_column(where, tmp_path):
    if where == "dense":  # a Llama-style dense model: its MLPs are experts of one
        folder = _build("llama", tmp_path / "model", super_weight=(1, None, 5, 17))
        section = _run(folder, tmp_path, "analysis.stages.experts.dense_models=true")["experts"]
        want = {"layer": 1, "kind": "dense", "expert": 0, "row": 5, "col": 17, "weight": 40.0}
    else:
        folder = _build("olmoe", tmp_path / "model", super_weight=(2, 3, 9, 30))
        section = _run(folder, tmp_path)["experts"]
        want = {"layer": 2, "kind": "routed", "expert": 3, "row": 9, "col": 30, "weight": 40.0}
    top = section["super_weight_candidates"][0]
    assert {k: top[k] for k in want} == want
    assert top["ratio_to_median_abs_weight"] > 100


# census families of distinct MoE layouts (the census plants one in every MoE family it builds):
# dense-first layers and shared experts with grouped top-k choices read from the experts' arguments,
# a transposed bank with biases, a block_sparse_moe with a shared MLP, a Mamba hybrid with MoE every
# other layer, an MoE block in the mixer slot with no gate bank
CENSUS_FAMILIES = ["deepseek_v3", "gpt_oss", "granitemoeshared", "jamba", "nemotron_h"]


@pytest.mark.parametrize("model_type", CENSUS_FAMILIES)
def test_a_super_weight_planted_in_a_census_family_is_found_at_its_layer_expert_row_and_column(model_type, tmp_path):
    """tiny.py's random model of the family; one down_proj weight of the most-routed expert of the
    first MoE layer set far above the rest (tests/helpers.py, plain transformers): the stage names
    that expert the only super expert and that weight, by row and column, the first candidate."""
    from helpers import plant_super_weight, super_weight_problems, super_weight_site

    from outlier_hydra.testing.tiny import build

    folder = build(model_type, tmp_path / "model", plant_dim=None)
    site = super_weight_site(_run(folder, tmp_path, "plots=false", name="plain"))
    assert site is not None, "the stage reads this family's experts"
    layer, experts_path, expert = site
    value = plant_super_weight(folder, experts_path, expert)
    section = _run(folder, tmp_path, "plots=false", name="planted")["experts"]
    assert super_weight_problems(section, layer, expert, value) == []


def test_model_output_is_bit_identical_with_the_stage(tmp_path):
    """The experts stage only reads: the last hidden state with its hooks and watch equals a plain
    forward, bit for bit."""
    from doubles import structure_points
    from transformers import AutoModel

    from outlier_hydra.collect import OutlierCollector
    from outlier_hydra.stages.experts import Experts

    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5))
    model = AutoModel.from_pretrained(folder).eval()
    ids = torch.randint(1000, 20000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
    points = structure_points(model, [0, 1, 2, 3])
    from outlier_hydra.models import discover, probe
    from outlier_hydra.models.configs import config_top_k

    structure = discover(model, 4, 64, None, "test")
    probe(structure, model, torch.device("cpu"), "test", config_top_k(model.config))
    stage = Experts(make_cfg().analysis.stages.experts)
    assert stage.bind(structure, [0, 1, 2, 3])
    seen = {}
    handle = model.register_forward_hook(lambda m, a, o: seen.setdefault("h", o.last_hidden_state.clone()))
    OutlierCollector(6.0, early_stop=False).collect_batch(model, points, ids, stages=[stage])
    handle.remove()
    assert torch.equal(seen["h"], plain)
    assert not torch._C._is_torch_function_mode_enabled()


def test_segment_counts_against_numpy():
    """The sync-free outlier counts (float16 one-hot products in blocks of 2048 rows): exact against
    numpy, with whole blocks and a remainder, invalid rows left out, and one segment of 6000 rows all
    at the threshold (counts far past float16's exact integers)."""
    from outlier_hydra.stages.experts.tensors import segment_counts

    rng = np.random.default_rng(0)
    rows, dims, n = 2048 * 3 + 777, 40, 5
    segment = rng.integers(0, n, rows)
    segment[:6000] = 3
    valid = rng.random(rows) < 0.9
    mask = rng.random((rows, dims)) < 0.3
    mask[:6000, 7] = True
    want = np.zeros((n, dims), np.int64)
    np.add.at(want, segment[valid], mask[valid].astype(np.int64))
    got = segment_counts(torch.from_numpy(segment), torch.from_numpy(valid), torch.from_numpy(mask), n)
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)
    assert want[3, 7] >= 5400  # the long segment: sums past 2048 stay exact
    few = segment_counts(torch.from_numpy(segment[:100]), torch.from_numpy(valid[:100]), torch.from_numpy(mask[:100]), n)
    small = np.zeros((n, dims), np.int64)
    np.add.at(small, segment[:100][valid[:100]], mask[:100][valid[:100]].astype(np.int64))
    assert np.array_equal(few.numpy(), small)


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_sync_free_counting_gives_the_same_statistics(impl, tmp_path, monkeypatch):
    """The GPU's ways (no host sync: |y| once, one-hot products, row maxima and records in torch ops;
    or the row maxima and counts in one Triton kernel, here in Triton's interpreter) run on the CPU
    against the CPU's way (only the rows at the threshold; the C++ row maxima and records): every
    array of the statistics equal, bit for bit."""
    from doubles import structure_points
    from transformers import AutoModel

    from outlier_hydra.collect import OutlierCollector
    from outlier_hydra.models import discover, probe
    from outlier_hydra.models.configs import config_top_k
    from outlier_hydra.stages.experts import Experts

    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5))
    model = AutoModel.from_pretrained(folder, experts_implementation=impl).eval()
    ids = torch.randint(1000, 20000, (3, 400), generator=torch.Generator().manual_seed(0))
    structure = discover(model, 4, 64, None, "test")
    probe(structure, model, torch.device("cpu"), "test", config_top_k(model.config))
    points = structure_points(model, [0, 1, 2, 3])
    got = {}
    from outlier_hydra.collect import fused_cpu

    for way in ("cpu", "torch", "triton"):
        if way != "cpu":  # the torch ops the GPU runs, not the C++ kernels
            monkeypatch.setattr(fused_cpu, "available", lambda: False)
        stage = Experts(make_cfg().analysis.stages.experts)
        stage.sync_free, stage.triton = way != "cpu", way == "triton"
        assert stage.bind(structure, [0, 1, 2, 3])
        got[way] = OutlierCollector(6.0).collect_batch(model, points, ids, stages=[stage]).extras["experts"]
    assert len(got["cpu"].counts) > 0 and got["cpu"].counts.max() > 1
    for way in ("torch", "triton"):
        for name in got["cpu"].__dataclass_fields__:
            assert np.array_equal(getattr(got["cpu"], name), getattr(got[way], name)), (way, name)


def test_a_triton_kernel_that_does_not_build_falls_back_to_torch_ops(tmp_path, monkeypatch, caplog):
    """Where Triton cannot compile the experts kernel (an old GPU, a broken toolchain), one warning and
    the torch ops: the same statistics, the collection goes on."""
    from doubles import structure_points
    from transformers import AutoModel
    from triton.compiler.errors import CompilationError

    from outlier_hydra.collect import OutlierCollector, fused_triton
    from outlier_hydra.models import discover, probe
    from outlier_hydra.models.configs import config_top_k
    from outlier_hydra.stages.experts import Experts

    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5))
    model = AutoModel.from_pretrained(folder).eval()
    ids = torch.randint(1000, 20000, (2, 64), generator=torch.Generator().manual_seed(0))
    structure = discover(model, 4, 64, None, "test")
    probe(structure, model, torch.device("cpu"), "test", config_top_k(model.config))
    points = structure_points(model, [0, 1])
    got = {}
    for broken in (False, True):
        if broken:

            def refuse(*args, **kwargs):
                raise CompilationError("kernel.py", None, "no such GPU")

            monkeypatch.setattr(fused_triton, "expert_rows", refuse)
        stage = Experts(make_cfg().analysis.stages.experts)
        stage.sync_free, stage.triton = True, broken  # the reference: the torch ops
        assert stage.bind(structure, [0, 1])
        with caplog.at_level("WARNING"):
            got[broken] = OutlierCollector(6.0).collect_batch(model, points, ids, stages=[stage]).extras["experts"]
    assert stage.triton is False
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelname == "WARNING"] == [
        "experts: Triton could not build its kernel"
    ]
    for name in got[False].__dataclass_fields__:
        assert np.array_equal(getattr(got[False], name), getattr(got[True], name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sorted_rows", [True, False], ids=["sorted", "mixed"])
@pytest.mark.parametrize("with_valid", [True, False], ids=["valid", "all"])
def test_expert_rows_against_numpy(dtype, sorted_rows, with_valid):
    """The experts stage's Triton kernels (without a GPU in Triton's interpreter, conftest), recomputed
    with numpy: per expert the rows counted, the largest row maximum of |y| and of |x| (a NaN row holds
    none, Inf is a maximum) and the row holding it (equal values: the earliest token, then the last
    row), and the per-(expert, dim) counts at the threshold. Values rounded to integers and tokens
    drawn from few make ties at every step. Sorted rows (grouped_mm's order) take the one-atomic-per-
    tile way, mixed rows the per-row one."""
    from outlier_hydra.collect import fused_triton

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(3)
    rows, out_dims, in_dims, experts = 300, 300, 40, 6  # several column tiles of y, rows across 19 programs
    y = (torch.randn(rows, out_dims, generator=g) * 3).round().to(dtype)
    x = (torch.randn(rows, in_dims, generator=g) * 2).round().to(dtype)
    y[:, 11] *= 10
    y[5, 3], y[9, 2], y[10, 280], x[7, 1], x[8, 0] = float("nan"), float("inf"), -float("inf"), float("nan"), float("inf")
    y[20, 4] = 6.0  # exactly the threshold
    expert = torch.randint(0, experts - 1, (rows,), generator=g)  # the last expert gets no row
    token = torch.randint(0, 40, (rows,), generator=g)
    token[:8] = fused_triton_unknown = 2**60  # rows whose token is not known rank after all, alike
    if sorted_rows:
        expert = expert.sort().values
    valid = torch.rand(rows, generator=g) < 0.8 if with_valid else None
    got = fused_triton.expert_rows(
        y.to(dev), x.to(dev), expert.to(dev), token.to(dev), None if valid is None else valid.to(dev), 6.0, experts
    )

    counted = np.ones(rows, bool) if valid is None else valid.numpy()
    e_of, t_of = expert.numpy(), token.numpy()

    def row_value(t):  # a row's max |t|; -1 for a row holding a NaN or not counted
        a = np.abs(t.float().numpy())
        value = np.where(np.isnan(a).any(1), -1.0, np.nanmax(np.where(np.isnan(a), 0, a), 1))
        return np.where(counted, value, -1.0)

    def best(t):
        value = row_value(t)
        top, at = np.full(experts, -1.0, np.float32), np.full(experts, -1)
        for e in range(experts):
            mine = [r for r in range(rows) if e_of[r] == e and value[r] >= 0]
            if mine:
                top[e] = max(value[r] for r in mine)
                first = min(t_of[r] for r in mine if value[r] == top[e])
                at[e] = max(r for r in mine if value[r] == top[e] and t_of[r] == first)
        return top, at

    a = np.abs(y.float().numpy())
    hit = (a >= np.float32(6.0)) & counted[:, None]
    want = np.zeros((experts, out_dims), np.int64)
    np.add.at(want, e_of, hit.astype(np.int64))
    (out_max, out_row), (in_max, in_row) = best(y), best(x)
    assert np.array_equal(got.row_out_max.cpu().numpy(), row_value(y).astype(np.float32))
    assert np.array_equal(got.out_max.cpu().numpy(), out_max) and np.array_equal(got.out_row.cpu().numpy(), out_row)
    assert np.array_equal(got.in_max.cpu().numpy(), in_max) and np.array_equal(got.in_row.cpu().numpy(), in_row)
    assert np.array_equal(got.tokens.cpu().numpy(), np.bincount(e_of, weights=counted, minlength=experts).astype(np.int64))
    assert got.counts.dtype == torch.int64 and np.array_equal(got.counts.cpu().numpy(), want)
    assert want[:, 11].sum() > 100 and out_row[-1] == in_row[-1] == -1 and got.tokens[-1] == 0
    assert float("inf") in out_max and float("inf") in in_max  # row 9's / row 8's expert
    # the tie rules were exercised: some expert's maximum is held by several rows, of different tokens
    ties = [
        e for e in range(experts - 1) if ((e_of == e) & counted & (np.abs(y.float().numpy()).max(1) == out_max[e])).sum() > 1
    ]
    assert ties and fused_triton_unknown in t_of


def test_expert_rows_an_expert_whose_outputs_are_all_zero_still_ran():
    """A maximum of exactly 0 at a token not known (the smallest key there is: 0) is a maximum: the
    expert ran, at its last row, and an expert with no row has none (-1)."""
    from outlier_hydra.collect import fused_triton
    from outlier_hydra.stages.experts import UNKNOWN_TOKEN

    y, x = torch.zeros(3, 4), torch.zeros(3, 2)
    got = fused_triton.expert_rows(y, x, torch.zeros(3, dtype=torch.long), torch.full((3,), UNKNOWN_TOKEN), None, 6.0, 2)
    assert got.out_max.tolist() == got.in_max.tolist() == [0.0, -1.0]
    assert got.out_row.tolist() == got.in_row.tolist() == [2, -1] and got.tokens.tolist() == [3, 0]


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync-free", "host"])
def test_the_torch_way_keeps_nan_rows_out_and_inf_as_a_maximum(sync_free):
    """rows_torch (the CPU's way, and the sync-free way of a GPU without triton) gives what the
    Triton kernels give: a row holding a NaN holds no value (an expert with only such rows has no
    maximum: -1, no row), an Inf is a maximum and stays Inf; recomputed by hand."""
    from outlier_hydra.stages.experts.tensors import rows_torch

    nan, inf = float("nan"), float("inf")
    y = torch.tensor([[1.0, nan], [2.0, -3.0], [-inf, 1.0], [5.0, 0.5]])
    x = torch.tensor([[nan, 1.0], [0.5, 0.25], [2.0, 1.0], [-inf, 0.0]])
    expert = torch.tensor([0, 1, 1, 2])
    tokens, out_max, out_row, in_max, in_row, counts, row_out_max = vars(
        rows_torch(x, y, expert, torch.arange(4), None, 3, sync_free, 4.0)
    ).values()
    assert row_out_max.tolist() == [-1.0, 3.0, inf, 5.0]
    assert out_max.tolist() == [-1.0, inf, 5.0] and out_row.tolist() == [-1, 2, 3]
    assert in_max.tolist() == [-1.0, 2.0, inf] and in_row.tolist() == [-1, 2, 3]
    assert tokens.tolist() == [1, 2, 1] and counts.tolist() == [[0, 0], [1, 0], [1, 0]]


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync-free", "host"])
def test_the_torch_way_counts_nothing_of_rows_not_valid(sync_free):
    """Rows past grouped_mm's last offset (valid False) are no expert's: no token, no maximum, no
    outlier count, however large; a row whose largest |y| is exactly the threshold counts."""
    from outlier_hydra.stages.experts.tensors import rows_torch

    y = torch.tensor([[4.0, 1.0], [9.0, -9.0], [2.0, 3.0], [8.0, 8.0]])
    x = torch.tensor([[1.0, 0.5], [7.0, 7.0], [0.25, 0.5], [6.0, 6.0]])
    expert = torch.tensor([0, 0, 1, 2])
    valid = torch.tensor([True, False, True, False])
    tokens, out_max, out_row, in_max, in_row, counts, row_out_max = vars(
        rows_torch(x, y, expert, torch.arange(4), valid, 3, sync_free, 4.0)
    ).values()
    assert row_out_max.tolist() == [4.0, -1.0, 3.0, -1.0]
    assert tokens.tolist() == [1, 1, 0] and counts.tolist() == [[1, 0], [0, 0], [0, 0]]
    assert out_max.tolist() == [4.0, 3.0, -1.0] and out_row.tolist() == [0, 2, -1]
    assert in_max.tolist() == [1.0, 0.5, -1.0] and in_row.tolist() == [0, 2, -1]


@pytest.mark.parametrize("one_key", [True, False], ids=["one-key", "three-sorts"])
@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_segment_top_against_a_plain_loop(k, one_key):
    """Per expert the k rows of largest row maximum, largest first, equal values by the earlier token
    (unknown tokens last, among themselves by row), rows holding none (-1) never, Inf a value; where
    fewer rows: -1, row 0 and the largest int64; against a plain sort of each expert's rows. Both
    ways: one sort of an int64 key (the batch's token bound given) and three stable sorts."""
    from outlier_hydra.stages.experts import UNKNOWN_TOKEN
    from outlier_hydra.stages.experts.tensors import segment_top

    g = torch.Generator().manual_seed(5)
    n, experts = 60, 6
    values = torch.randint(0, 6, (n,), generator=g).float()  # few values: ties everywhere
    values[::7] = -1.0  # rows that hold no value (NaN, not counted)
    values[[3, 4]] = float("inf")
    expert = torch.randint(0, experts - 2, (n,), generator=g)  # the last expert gets no row
    token = torch.randperm(n, generator=g) * 1000  # tokens of a batch of 60,000 positions
    token[[5, 6, 8, 9, 10, 11]] = UNKNOWN_TOKEN
    expert[[12, 13]], values[[12, 13]], token[[12, 13]] = 4, torch.tensor([-1.0, 0.0]), torch.tensor([1, 2])  # 0 < none
    # an unknown token's value one float32 step above a known token's: the value decides, not the token
    expert[[15, 16]], token[[15, 16]] = 3, torch.tensor([UNKNOWN_TOKEN, 0])
    values[15], values[16] = 7.0, torch.nextafter(torch.tensor(7.0), torch.tensor(0.0))
    top, rows, tokens = segment_top(values, expert, token, experts, k, 60_000 if one_key else None)
    assert top.shape == rows.shape == tokens.shape == (experts, k)
    for e in range(experts):
        mine = sorted((-float(values[r]), int(token[r]), r) for r in range(n) if expert[r] == e and values[r] >= 0)[:k]
        want_top = [-v for v, _, _ in mine] + [-1.0] * (k - len(mine))
        want_tok = [t for _, t, _ in mine] + [torch.iinfo(torch.long).max] * (k - len(mine))
        assert top[e].tolist() == want_top and tokens[e].tolist() == want_tok, e
        assert rows[e].tolist() == [r for _, _, r in mine] + [0] * (k - len(mine)), e


def test_expert_statistics_merge_keeps_the_largest_top_outputs_earlier_token_on_ties():
    """ExpertStats.merge's top outputs: per unit the T largest of both sides, equal values by the
    earlier token, each with its own dim; none (-1) last; so merging shards gives one run's tops."""
    from outlier_hydra.stages.experts import ExpertStats

    big = np.iinfo(np.int64).max

    def stats(top, token):
        n = len(top)
        one = np.zeros(n, np.int64)
        return ExpertStats(
            keys=np.asarray([(0, 0, 0, e) for e in range(n)], np.int64),
            **{k: one.copy() for k in ("tokens", "out_dim", "out_token", "col", "in_channel", "in_token")},
            **{k: np.full(n, -1.0) for k in ("out_max", "weight", "contribution", "in_max", "median_abs_weight")},
            count_keys=np.zeros((0, 2), np.int64),
            counts=np.zeros(0, np.int64),
            top_out=np.asarray(top, float),
            top_dim=(np.asarray(token, np.int64) % 97),  # each entry's dim travels with it
            top_token=np.asarray(token, np.int64),
        )

    a = stats([[9, 5, 5], [4, -1, -1], [-1, -1, -1]], [[40, 7, 30], [3, big, big], [big, big, big]])
    b = stats([[5, 5, 1], [8, 4, 2], [-1, -1, -1]], [[20, 50, 2], [60, 1, 9], [big, big, big]])
    m = a.merge(b)
    assert m.top_out.tolist() == [[9, 5, 5], [8, 4, 4], [-1, -1, -1]]
    assert m.top_token.tolist() == [[40, 7, 20], [60, 1, 3], [big, big, big]]
    assert m.top_dim.tolist() == (m.top_token % 97).tolist()
    assert np.array_equal(b.merge(a).top_token, m.top_token)


def _reanalyze(run_dir, *args):
    return subprocess.run(
        [sys.executable, "-m", "outlier_hydra", "reanalyze", str(run_dir), *args], capture_output=True, text=True, cwd=REPO
    )


def test_reanalyze_changes_the_super_expert_constants(tmp_path):
    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5))
    first = _run(folder, tmp_path)["experts"]
    assert len(first["super_experts"]) == 1
    proc = _reanalyze(
        tmp_path / "run",
        "analysis.stages.experts.super_percentile=50",
        "analysis.stages.experts.super_fraction=0.0",
        "--out",
        str(tmp_path / "re"),
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    again = json.loads((tmp_path / "re" / "final_analysis_results.json").read_text())["experts"]
    routed = [u["max_output"] for u in again["units"] if u["kind"] == "routed" and u["max_output"] is not None]
    cut = np.percentile(routed, 50)
    assert len(again["super_experts"]) == sum(m > cut for m in routed) > 1
    assert again["units"] == first["units"]  # the statistics are the same; only the rule changed
    # a setting that changes what is collected needs a new run: one line, exit code 2
    proc = _reanalyze(tmp_path / "run", "analysis.stages.experts.magnitude_threshold=3")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("outlier-hydra reanalyze: error: analysis.stages.experts.magnitude_threshold: reanalysis")
    assert "analysis.stages.experts.super_fraction" in line


def test_super_expert_share_of_the_systematic_outlier_positions(tmp_path):
    """With an outlier planted in the embeddings (dim 13 at every 7th token id, a systematic feature
    at every MLP input): the share of those outlier positions at the super expert's layer that the
    router sent to it, against the routing recomputed from plain hooks."""
    from helpers import module_input_tables
    from transformers import AutoModel

    from outlier_hydra.testing.tiny import plant_embedding_outlier

    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5), plant_dim=13)
    model = AutoModel.from_pretrained(folder)
    plant_embedding_outlier(model, 29, every=5)  # a second systematic feature
    with torch.no_grad():  # dim 13's positions go to the super expert, dim 29's away from it
        model.layers[2].mlp.gate.weight[5, 13] = 2.0
        model.layers[2].mlp.gate.weight[5, 29] = -2.0
    model.save_pretrained(folder)
    results = _run(folder, tmp_path)
    dims = [r["feature_dim"] for r in results["systematic_outliers"]]
    assert {13, 29} <= set(dims)
    (s,) = results["experts"]["super_experts"]
    ids = np.load(tmp_path / "run" / "token_ids.npy")
    _, tables = module_input_tables(folder, [], {2: ("layers.2.mlp", "layers.2.mlp.gate", "layers.2.mlp.experts")}, ids, 4)
    x, idx = tables[2]["x"], tables[2]["idx"]
    positions = chosen = 0
    for d in dims:
        hit = np.abs(x[:, d]) >= 6.0
        positions += int(hit.sum())
        chosen += int((idx[hit] == 5).sum())
        assert hit.any(), d  # both dims add outlier positions
    assert 0 < chosen < positions  # a share strictly between 0 and 1
    assert s["systematic_outlier_positions"] == positions
    assert s["systematic_outlier_positions_routed_to_it"] == chosen
    assert s["systematic_outlier_positions_share"] == chosen / positions


def test_massive_activations_routed_to_the_super_expert(tmp_path):
    """A super expert planted at layer 2 makes massive activations in the residual stream after it;
    massive_routing counts the distinct massive positions whose token chose that expert at layer 2,
    against the choices read with a plain pre-hook."""
    from helpers import module_input_tables

    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5))
    results = _run(
        folder,
        tmp_path,
        "analysis.stages.massive_activations.enabled=true",
        "analysis.stages.massive_routing.enabled=true",
        "analysis.stages.massive_activations.min_magnitude=5",
        "analysis.stages.massive_activations.min_ratio_to_median=10",
        "analysis.stages.massive_routing.batch_size=1",  # one forward per sequence: every one is read
    )
    found = {
        (m["sequence"], m["position"])
        for entry in results["massive_activations"]["layers"]
        if entry["layer"] >= 2
        for m in entry["massive"]
    }
    assert len({seq for seq, _ in found}) > 1, "the planted expert makes massive activations in several sequences"
    (row,) = results["massive_routing"]["super_experts"]
    ids = np.load(tmp_path / "run" / "token_ids.npy")
    _, tables = module_input_tables(folder, [], {2: ("layers.2.mlp", "layers.2.mlp.gate", "layers.2.mlp.experts")}, ids, 4)
    idx = tables[2]["idx"].reshape(ids.shape[0], ids.shape[1], -1)
    routed = sum(1 for seq, pos in found if 5 in idx[seq, pos])
    assert (row["layer"], row["expert"], row["positions"]) == (2, 5, len(found))
    assert row["positions_routed_to_it"] == routed > 0
    assert row["share"] == routed / len(found)
    entries = [m for entry in results["massive_activations"]["layers"] if entry["layer"] >= 2 for m in entry["massive"]]
    assert row["massive_activations"] == len(entries) >= len(found)
    # the W&B table and the summary line
    from outlier_hydra.stages.massive_routing import MassiveRouting

    stage = MassiveRouting(make_cfg().analysis.stages.massive_routing)
    assert stage.rows(results["massive_routing"]) == {
        "super_experts": (
            ["layer", "expert", "massive_positions", "routed_to_it", "share"],
            [[2, 5, len(found), routed, routed / len(found)]],
        )
    }
    assert stage.summary(results["massive_routing"]) == [
        f"layer 2 expert 5 received {routed} of the {len(found)} massive-activation positions after it"
    ]


def _unit_truth(h, y, token, w, threshold):
    """Independent numbers of one unit from its down-projection rows: h [n, I] in, y [n, H] out,
    token [n] global flat token index, w [H, I] its matrix (numpy float32)."""
    ay, ah = np.abs(y), np.abs(h)
    y_row, h_row = ay.max(1), ah.max(1)
    r = int(np.flatnonzero(y_row == y_row.max())[np.argmin(token[y_row == y_row.max()])])  # ties: earliest token
    dim = int(ay[r].argmax())
    contrib = w[dim] * h[r]  # float32, as the weight meets the input
    col = int(np.abs(contrib).argmax())
    flat = np.sort(np.abs(w).ravel())
    median = float(flat[(flat.size - 1) // 2])  # torch.median: the lower middle of an even count
    counts = (ay >= threshold).sum(0)
    return {
        "tokens": len(y),
        "max_output": float(y_row.max()),
        "max_output_dim": dim,
        "token_index": int(token[r]),
        "max_input": float(h_row.max()),
        "max_input_channel": int(ah[int(h_row.argmax())].argmax()),
        "outlier_dims": sorted(((int(c), d) for d, c in enumerate(counts) if c), key=lambda t: (-t[0], t[1]))[:5],
        "super_weight_candidate": {
            "row": dim,
            "col": col,
            "weight": float(w[dim, col]),
            "ratio_to_median_abs_weight": abs(float(w[dim, col])) / median,
            "contribution": float(contrib[col]),
        },
    }


@pytest.mark.parametrize("width", [64, 128, 32], ids=["equal", "wider", "narrower"])
def test_every_routed_shared_and_dense_unit_against_plain_hooks(width, tmp_path):
    """A Qwen2-MoE with a dense layer 1 (mlp_only_layers) and a shared expert in each MoE layer,
    their intermediate width equal to the hidden size (64), wider or narrower (the down projection is
    the matmul whose output is the block's, whatever its widths), the first two windows skipped:
    every unit's tokens, maxima, dims, channels, outlier counts, position (token index, sequence,
    position, token id) and super-weight candidate equal plain hooks on the down projections and a
    Python loop over the routed experts; the candidates are ordered by |contribution|, the top 10
    (top_units); nothing is unobserved."""
    from transformers import AutoModel

    from outlier_hydra.testing.tiny import tiny_config

    folder = tmp_path / "model"
    _build("qwen2_moe", folder)  # tokenizer and weights; rebuilt below with a dense layer
    config = tiny_config("qwen2_moe")
    assert config.hidden_size == 64
    config.mlp_only_layers = [1]
    config.intermediate_size = config.shared_expert_intermediate_size = width
    torch.manual_seed(1)
    AutoModel.from_config(config).eval().save_pretrained(folder)
    threshold, skip, length = 0.004, 2, 32
    results = _run(
        folder,
        tmp_path,
        f"analysis.stages.experts.magnitude_threshold={threshold}",
        "analysis.stages.experts.top_units=10",
        f"dataset.skip_sequences={skip}",
    )
    section = results["experts"]
    ids = np.load(tmp_path / "run" / "token_ids.npy")
    assert ids.shape == (8, length)

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    seen: dict = {}
    handles = []
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            handles.append(
                mlp.experts.register_forward_pre_hook(
                    lambda m, a, k, i=i: seen.setdefault((i, "routed"), []).append((a[0].clone(), a[1].clone())),
                    with_kwargs=True,
                )
            )
            down, kind = mlp.shared_expert.down_proj, "shared"
        else:
            down, kind = mlp.down_proj, "dense"
        handles.append(
            down.register_forward_hook(
                lambda m, a, o, key=(i, kind): seen.setdefault(key, []).append((a[0].clone(), o.clone()))
            )
        )
    with torch.no_grad():
        for s in range(0, len(ids), 4):
            model(input_ids=torch.from_numpy(ids[s : s + 4]))
    for handle in handles:
        handle.remove()

    def flat_tokens(batch, n):  # global flat index of each row of batch b: (skip + sequence) * length + position
        return (skip + 4 * batch) * length + np.arange(n)

    truth = {}
    with torch.no_grad():
        for (i, kind), calls in seen.items():
            if kind != "routed":
                h = np.concatenate([a.reshape(-1, a.shape[-1]).numpy() for a, _ in calls])
                y = np.concatenate([o.reshape(-1, o.shape[-1]).numpy() for _, o in calls])
                token = np.concatenate([flat_tokens(b, a[..., 0].numel()) for b, (a, _) in enumerate(calls)])
                w = (model.layers[i].mlp.shared_expert if kind == "shared" else model.layers[i].mlp).down_proj.weight
                truth[(i, kind, 0)] = _unit_truth(h, y, token, w.numpy(), threshold)
                continue
            ex = model.layers[i].mlp.experts
            for e in range(ex.down_proj.shape[0]):
                h, y, rows = expert_rows(ex, calls, e)
                token = np.concatenate([flat_tokens(b, len(x))[r.numpy()] for b, ((x, _), r) in enumerate(zip(calls, rows))])
                truth[(i, "routed", e)] = _unit_truth(h.numpy(), y.numpy(), token, ex.down_proj[e].numpy(), threshold)

    units = {(u["layer"], u["kind"], u["expert"]): u for u in section["units"]}
    assert set(units) == set(truth) and len(truth) == 3 * 9 + 1
    assert {k for k in truth if k[1] != "routed"} == {(0, "shared", 0), (1, "dense", 0), (2, "shared", 0), (3, "shared", 0)}
    for key, want in truth.items():
        u = units[key]
        exact = key[1] != "routed"  # the same tensors; routed: grouped_mm and F.linear round apart
        close = (lambda v: v) if exact else (lambda v: pytest.approx(v, rel=1e-5))
        assert u["tokens"] == want["tokens"], key
        assert u["max_output"] == close(want["max_output"]), key
        assert u["max_input"] == close(want["max_input"]), key
        assert (u["max_output_dim"], u["max_input_channel"]) == (want["max_output_dim"], want["max_input_channel"]), key
        assert [(o["count"], o["dim"]) for o in u["outlier_dims"]] == want["outlier_dims"], key
        seq, pos = divmod(want["token_index"], length)
        assert u["max_output_at"] == {
            "token_index": want["token_index"],
            "sequence": seq,
            "position": pos,
            "token_id": int(ids[seq - skip, pos]),
            "token": u["max_output_at"]["token"],
        }, key
        cand, w_cand = u["super_weight_candidate"], want["super_weight_candidate"]
        assert (cand["row"], cand["col"], cand["weight"]) == (w_cand["row"], w_cand["col"], w_cand["weight"]), key
        assert cand["ratio_to_median_abs_weight"] == w_cand["ratio_to_median_abs_weight"], key
        assert cand["contribution"] == close(w_cand["contribution"]), key
    assert any(u["outlier_dims"] for u in units.values()) and not section["unobserved_layers"]
    assert section["unobserved"] == []
    order = [(c["layer"], c["kind"], c["expert"]) for c in section["super_weight_candidates"]]
    assert order == sorted(truth, key=lambda k: -abs(truth[k]["super_weight_candidate"]["contribution"]))[:10]
    for c in section["super_weight_candidates"]:
        assert {k: v for k, v in c.items() if k not in ("layer", "kind", "expert")} == units[
            (c["layer"], c["kind"], c["expert"])
        ]["super_weight_candidate"]
    # the router stage of the same run, past the dense layer: each MoE layer's tokens and choices
    routing = {entry["layer"]: entry for entry in results["moe_routing"]["layers"]}
    assert sorted(routing) == [0, 2, 3]
    for i in (0, 2, 3):
        idx = np.concatenate([index.reshape(-1, index.shape[-1]).numpy() for _, index in seen[(i, "routed")]])
        experts = model.layers[i].mlp.experts.down_proj.shape[0]
        assert routing[i]["tokens"] == len(idx) == ids.size
        assert routing[i]["tokens_per_expert"] == np.bincount(idx.ravel(), minlength=experts).tolist()


def test_saved_statistics_give_every_collect_section_back_without_the_model(tmp_path):
    """Each stage's statistics go to the batch files (to_arrays) and come back (from_arrays): read
    in-process and analysed again, every collect stage's section and every batch document equal the
    run's (allowed_targets empty: the project's own stages need none)."""
    from outlier_hydra.analysis import build_documents
    from outlier_hydra.pipeline import rundir
    from outlier_hydra.tools.saved_run import load_run, report_context

    folder = _build("olmoe", tmp_path / "model", super_expert=(2, 5), plant_dim=13)
    results = _run(
        folder,
        tmp_path,
        "analysis.stages.massive_activations.enabled=true",
        "analysis.stages.massive_activations.min_magnitude=5",
        "analysis.stages.massive_activations.min_ratio_to_median=10",
    )
    assert any(entry["massive"] for entry in results["massive_activations"]["layers"])
    saved = load_run(tmp_path / "run", [])
    assert len(saved.batches) == results["num_batches"] == 2
    header = {k: results[k] for k in ("model", "dataset", "collector")}
    per_batch, final, total = build_documents(header, saved.analyzer(), saved.batches, saved.stages, **report_context(saved))
    collect = [s.name for s in saved.stages if s.phase == "collect"]
    assert collect == ["moe_routing", "massive_activations", "experts"]
    for name in collect:
        assert final[name] == results[name], name
        for b, doc in enumerate(per_batch):
            assert doc[name] == rundir.read_json(tmp_path / "run" / rundir.batch_results_name(b))[name], (name, b)
    assert final["systematic_outliers"] == results["systematic_outliers"]

    # the super-expert rule at other constants, on the same statistics: above the percentile of all
    # routed experts' maxima and above the fraction of the largest, largest first; fields as the unit's
    from outlier_hydra.stages import ReportContext

    stage = next(s for s in saved.stages if s.name == "experts")
    ctx = ReportContext(records=final["systematic_outliers"], extras=total.extras, **report_context(saved))
    routed = [u for u in results["experts"]["units"] if u["kind"] == "routed" and u["max_output"] is not None]
    maxima = np.asarray([u["max_output"] for u in routed])
    assert results["experts"]["criteria"] == {"magnitude_threshold": 6.0, "super_percentile": 99.5, "super_fraction": 0.1}
    _tables_and_summaries_carry_the_sections(saved.stages, results)
    for percentile, fraction in ((99.5, 0.1), (100.0, 0.0), (0.0, 1.0), (0.0, 0.0), (50.0, 0.0), (0.0, 0.05)):
        stage.config.super_percentile, stage.config.super_fraction = percentile, fraction
        section = stage.report(total.extras["experts"], ctx)
        assert section["criteria"]["super_percentile"] == percentile and section["criteria"]["super_fraction"] == fraction
        cut, big = np.percentile(maxima, percentile), fraction * maxima.max()
        want = sorted((u for u in routed if u["max_output"] > cut and u["max_output"] > big), key=lambda u: -u["max_output"])
        got = section["super_experts"]
        assert [(g["layer"], g["expert"]) for g in got] == [(u["layer"], u["expert"]) for u in want], (percentile, fraction)
        for g, u in zip(got, want):
            assert {k: g[k] for k in ("max_output", "max_output_dim", "max_output_at", "tokens")} == {
                k: u[k] for k in ("max_output", "max_output_dim", "max_output_at", "tokens")
            }


def test_the_down_projection_is_the_matmul_whose_output_is_the_blocks_output():
    """The probe names each MLP's down projection by what it does: the matmul whose output the block
    returns, wherever it is registered and whatever its widths (a square one included); a block whose
    output is made after its last matmul, or is not of the hidden size, has none and says why."""
    from torch import nn

    from outlier_hydra.models.probe import _output_matmuls, _watch_block_outputs
    from outlier_hydra.models.types import LayerParts, Structure

    class Square(nn.Module):  # registered out of order, every width the hidden size
        def __init__(self):
            super().__init__()
            self.out, self.inner = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.out(torch.relu(self.inner(x)))

    class Scaled(Square):  # the output is made after the last matmul
        def forward(self, x):
            return super().forward(x) * 2

    class Dropped(Square):  # an identity after it (dropout at eval) still returns the matmul's tensor
        def forward(self, x):
            return nn.functional.dropout(super().forward(x), 0.1, training=False)

    blocks = {"a": Square(), "b": Scaled(), "c": Dropped(), "d": nn.Linear(8, 32), "e": nn.Linear(8, 8)}
    model = nn.ModuleDict(blocks)
    parts = [LayerParts(i, str(i), None, None, name, "MLP") for i, name in enumerate(blocks)]
    structure = Structure("", 8, parts, "discovered")
    modules, handles = dict(model.named_modules()), []
    seen = _watch_block_outputs(structure, modules, handles)
    with torch.no_grad():
        for block in blocks.values():
            block(torch.randn(3, 8))
    for h in handles:
        h.remove()
    _output_matmuls(structure, modules, seen)
    assert structure.output_matmul == {"a": "a.out", "c": "c.out", "e": "e"}
    assert structure.no_output_matmul == {
        "b": "no matmul's output is its output (it is computed after its last matmul)",
        "d": "its output is not of the hidden size 8 (its down projection lies outside it)",
    }


def test_an_mlp_the_stage_cannot_read_is_listed_as_unobserved_and_logged_once(tmp_path, caplog):
    """MiniLM with dense_models=true: BERT's MLP input block (intermediate) ends in the activation, its
    down projection lies in the next block: every layer's unit is listed in `unobserved` with the
    reason, the summary says so, and the log says it once."""
    import logging

    caplog.set_level(logging.WARNING, logger="outlier_hydra")
    results = run(make_cfg("analysis.stages.experts.dense_models=true", "plots=false"), tmp_path / "run")
    section = results["experts"]
    assert section["units"] == [] and section["super_experts"] == []
    assert [(u["layer"], u["kind"], u["module"]) for u in section["unobserved"]] == [
        (i, "dense", f"encoder.layer.{i}.intermediate") for i in range(6)
    ]
    assert {u["reason"] for u in section["unobserved"]} == {
        "its output is not of the hidden size 384 (its down projection lies outside it)"
    }
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and "6 unit(s)" in warnings[0]
    from outlier_hydra.stages.experts import report

    assert report.summary(section)[0].startswith("6 units not observable (e.g. encoder.layer.0.intermediate: its output")


def _tables_and_summaries_carry_the_sections(stages, results):
    """What W&B's tables (rows) and the summary table show, field by field from the sections."""
    stage = {s.name: s for s in stages}
    moe, massive, experts = results["moe_routing"], results["massive_activations"], results["experts"]
    feats = [f for f in moe["features"] if f["layers"]]
    assert feats, moe["features"]
    assert massive["layers"] and experts["super_experts"]
    assert stage["moe_routing"].rows(moe) == {
        "feature_top_expert": (
            ["feature_dim", "layer", "outlier_positions", "top_expert", "position_share", "choice_share"],
            [
                [f["feature_dim"], e["layer"], e["outlier_positions"], t["expert"], t["position_share"], t["share"]]
                for f in moe["features"]
                for e in f["layers"]
                for t in e["top_experts"][:1]
            ],
        ),
        "layers": (
            ["layer", "entropy_mean", "top1_share_mean", "tokens_per_expert"],
            [[e["layer"], e["entropy_mean"], e["top1_share_mean"], str(e["tokens_per_expert"])] for e in moe["layers"]],
        ),
    }
    assert stage["moe_routing"].summary(moe) == [
        f"dim {f['feature_dim']}: outlier positions go most to expert {f['top_experts_all_layers'][0]['expert']} "
        f"({100 * f['top_experts_all_layers'][0]['share']:.0f}% of their top-k choices, over {len(f['layers'])} MoE layers)"
        for f in moe["features"]
        if f["top_experts_all_layers"]
    ]
    found = [(e["layer"], m) for e in massive["layers"] for m in e["massive"]]
    assert stage["massive_activations"].rows(massive) == {
        "massive": (
            ["layer", "value", "dim", "sequence", "position", "token"],
            [[layer, m["value"], m["dim"], m["sequence"], m["position"], m.get("token", "")] for layer, m in found],
        )
    }
    assert stage["massive_activations"].summary(massive) == [
        f"{len(found)} massive activations in {len({layer for layer, _ in found})} layers, "
        f"dims {sorted({m['dim'] for _, m in found})}"
    ]
    assert stage["massive_activations"].summary({"layers": [{"layer": 0, "massive": []}]}) == ["no massive activations"]
    top = sorted((u for u in experts["units"] if u["max_output"] is not None), key=lambda u: -u["max_output"])
    assert len(top) > stage["experts"].config.top_units
    assert stage["experts"].rows(experts) == {
        "super_experts": (
            ["layer", "expert", "max_output", "dim", "token", "top_tokens"],
            [
                [
                    s["layer"],
                    s["expert"],
                    s["max_output"],
                    s["max_output_dim"],
                    s["max_output_at"]["token"],
                    " ".join(t["token"] for t in s["top_outputs"]),
                ]
                for s in experts["super_experts"]
            ],
        ),
        "super_weight_candidates": (
            ["layer", "kind", "expert", "row", "col", "weight", "ratio_to_median"],
            [
                [w["layer"], w["kind"], w["expert"], w["row"], w["col"], w["weight"], w["ratio_to_median_abs_weight"]]
                for w in experts["super_weight_candidates"]
            ],
        ),
        "largest_outputs": (
            ["layer", "kind", "expert", "tokens", "max_output", "dim", "max_input"],
            [
                [u["layer"], u["kind"], u["expert"], u["tokens"], u["max_output"], u["max_output_dim"], u["max_input"]]
                for u in top[: stage["experts"].config.top_units]
            ],
        ),
    }
    # where no token is known (an implementation that hides the positions, no tokenizer): an empty cell
    hidden = {"max_output_at": {"token_index": None}, "top_outputs": []}
    unknown = {**experts, "super_experts": [{**experts["super_experts"][0], **hidden}]}
    assert [row[4:] for row in stage["experts"].rows(unknown)["super_experts"][1]] == [["", ""]]
    named = ", ".join(
        f"layer {s['layer']} expert {s['expert']} ({s['max_output']:.0f} on "
        + ", ".join(repr(t) for t in list(dict.fromkeys(t["token"] for t in s["top_outputs"]))[:3])
        + ")"
        for s in experts["super_experts"]
    )
    assert stage["experts"].summary(experts) == [f"super experts: {named}"]
    one = unknown["super_experts"][0]  # no tokens known: no "on ..."
    assert stage["experts"].summary(unknown) == [
        f"super experts: layer {one['layer']} expert {one['expert']} ({one['max_output']:.0f})"
    ]
    assert stage["experts"].summary({**experts, "super_experts": [], "unobserved_layers": [1, 3]}) == [
        "routed experts not observable in layers [1, 3]",
        "no super experts",
    ]


def test_expert_statistics_merge_keeps_each_record_with_its_maximum_earlier_token_on_ties():
    """ExpertStats.merge, field by field: tokens and outlier counts add (sparse keys sorted); each
    maximum brings its record (dim, token, column, weight, contribution; channel and token for the
    input) from the side that holds it, the earlier token on equal values, never from a side that did
    not run (-1); units must match."""
    from outlier_hydra.stages.experts import ExpertStats

    def stats(out_max, out_token, in_max, in_token, tag, median, count_keys, counts):
        n = len(out_max)
        return ExpertStats(
            keys=np.asarray([(1, 0, 0, e) for e in range(n)], np.int64),
            tokens=np.arange(n, dtype=np.int64) + 10 * tag,
            out_max=np.asarray(out_max, float),
            out_dim=np.full(n, tag, np.int64),
            out_token=np.asarray(out_token, np.int64),
            col=np.full(n, 100 + tag, np.int64),
            weight=np.full(n, 0.5 * tag),
            contribution=np.full(n, -0.25 * tag),
            in_max=np.asarray(in_max, float),
            in_channel=np.full(n, 200 + tag, np.int64),
            in_token=np.asarray(in_token, np.int64),
            median_abs_weight=np.asarray(median, float),
            count_keys=np.asarray(count_keys, np.int64).reshape(-1, 2),
            counts=np.asarray(counts, np.int64),
            top_out=np.full((n, 0), -1.0),  # merged in test_expert_statistics_merge_keeps_the_largest_top_outputs...
            top_dim=np.zeros((n, 0), np.int64),
            top_token=np.zeros((n, 0), np.int64),
        )

    big = 2**62
    a = stats([5, 5, -1, 4, -1], [10, 3, big, 1, big], [2, 2, 7, -1, -1], [4, 4, 9, big, big], 1,
              [0.5, -1, 0.2, -1, 0.1], [(0, 1), (2, 0)], [2, 1])  # fmt: skip
    b = stats([5, 5, 2, -1, -1], [3, 10, 7, 0, 0], [2, 1, 7, -1, -1], [1, 1, 2, 0, 0], 2,
              [0.5, 0.3, 0.2, 0.4, 0.3], [(0, 1), (1, 5)], [3, 4])  # fmt: skip
    m = a.merge(b)
    out_from = [2, 1, 2, 1, 1]  # row 0 tie, b earlier; row 1 tie, a earlier; row 2 only b ran; 3, 4: a
    assert m.out_dim.tolist() == out_from and m.col.tolist() == [100 + t for t in out_from]
    assert m.out_max.tolist() == [5, 5, 2, 4, -1] and m.out_token.tolist() == [3, 3, 7, 1, big]
    assert m.weight.tolist() == [0.5 * t for t in out_from] and m.contribution.tolist() == [-0.25 * t for t in out_from]
    in_from = [2, 1, 2, 1, 1]  # row 0 tie, b earlier; row 1 a larger; row 2 tie, b earlier; 3, 4: neither ran
    assert m.in_channel.tolist() == [200 + t for t in in_from]
    assert m.in_max.tolist() == [2, 2, 7, -1, -1] and m.in_token.tolist() == [1, 4, 2, big, big]
    assert m.tokens.tolist() == (a.tokens + b.tokens).tolist()
    assert m.median_abs_weight.tolist() == [0.5, 0.3, 0.2, 0.4, 0.1]
    assert m.count_keys.tolist() == [[0, 1], [1, 5], [2, 0]] and m.counts.tolist() == [5, 4, 1]
    assert m.count_keys.dtype == np.int64 and m.counts.dtype == np.int64 and np.array_equal(m.keys, a.keys)
    other = stats([1], [0], [1], [0], 1, [0.1], [], [])
    with pytest.raises(ValueError) as err:
        a.merge(other)
    assert str(err.value) == "expert statistics of different units"

    # a maximum of 0 is a record (only -1 is none): the earlier token still wins the tie; with the same
    # token (both unknown: an implementation that hides the positions) the first side keeps it, as one
    # job's batches merge in order; a median |w| of 0 is known (only -1 is not); with no outlier counts
    # on either side the count arrays are still int64
    unknown = 2**60
    c = stats([0, 3], [5, unknown], [0, 3], [5, unknown], 1, [0.0, -1], [], [])
    d = stats([0, 3], [2, unknown], [0, 3], [2, unknown], 2, [-1, 0.0], [], [])
    m = c.merge(d)
    assert m.out_dim.tolist() == [2, 1] and m.out_token.tolist() == [2, unknown]
    assert m.in_channel.tolist() == [202, 201] and m.in_token.tolist() == [2, unknown]
    assert m.median_abs_weight.tolist() == [0.0, 0.0]
    assert m.count_keys.shape == (0, 2) and m.count_keys.dtype == np.int64
    assert m.counts.shape == (0,) and m.counts.dtype == np.int64


def test_the_summary_names_the_first_six_super_experts():
    from outlier_hydra.stages.experts import Experts

    supers = [{"layer": i, "expert": 10 + i, "max_output": 100.0 * (9 - i)} for i in range(8)]
    assert Experts(make_cfg().analysis.stages.experts).summary({"super_experts": supers}) == [
        "super experts: layer 0 expert 10 (900), layer 1 expert 11 (800), layer 2 expert 12 (700), "
        "layer 3 expert 13 (600), layer 4 expert 14 (500), layer 5 expert 15 (400)"
    ]
    # with its top outputs: their first three distinct tokens (known ones only)
    tops = [{"token": t} for t in ("<s>", ",", "<s>", "the", "of")] + [{"token_index": None}]
    supers = [{"layer": 1, "expert": 68, "max_output": 744.4, "top_outputs": tops}]
    assert Experts(make_cfg().analysis.stages.experts).summary({"super_experts": supers}) == [
        "super experts: layer 1 expert 68 (744 on '<s>', ',', 'the')"
    ]


class _ListExperts(torch.nn.ModuleList):
    """Experts as a list of MLP modules, as remote-code MoE models keep them: a loop over the routing
    with the fused bank's weights copied into one gate_up and one down Linear per expert."""

    def __init__(self, fused):
        n, two_i, hidden = fused.gate_up_proj.shape
        experts = []
        for e in range(n):
            m = torch.nn.Module()
            m.gate_up = torch.nn.Linear(hidden, two_i, bias=False)
            m.down = torch.nn.Linear(two_i // 2, hidden, bias=False)
            m.gate_up.weight.data, m.down.weight.data = fused.gate_up_proj[e].clone(), fused.down_proj[e].clone()
            experts.append(m)
        super().__init__(experts)
        self.__dict__["act"] = fused.act_fn  # not a child: the list holds only its experts

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e, ex in enumerate(self):
            rows, slot = torch.where(top_k_index == e)
            if len(rows):
                gate, up = ex.gate_up(hidden[rows]).chunk(2, -1)
                out.index_add_(0, rows, ex.down(self.act(gate) * up) * top_k_weights[rows, slot, None])
        return out


def test_experts_kept_as_a_list_of_modules_are_read_through_their_down_linears(tmp_path):
    """A MoE whose experts are a ModuleList (no 3-D bank): each expert's down Linear is a unit; its
    tokens, max |output| with its dim, max |input| with its channel and outlier counts equal plain
    hooks on those Linears; where the maximum occurs is unknown (a list expert sees only its own
    rows), so no token is reported for it."""
    from doubles import structure_points
    from transformers import AutoModel

    from outlier_hydra.collect import OutlierCollector
    from outlier_hydra.models import discover, probe
    from outlier_hydra.models.configs import config_top_k
    from outlier_hydra.stages import ReportContext
    from outlier_hydra.stages.experts import Experts

    model = AutoModel.from_pretrained(_build("olmoe", tmp_path / "model", super_expert=(2, 5))).eval()
    for layer in model.layers:
        layer.mlp.experts = _ListExperts(layer.mlp.experts)
    structure = discover(model, 4, 64, None, "test")
    probe(structure, model, torch.device("cpu"), "test", config_top_k(model.config))
    stage = Experts(make_cfg().analysis.stages.experts)
    assert stage.bind(structure, [0, 1, 2, 3])
    ids = torch.randint(1000, 20000, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = OutlierCollector(6.0, early_stop=False).collect_batch(
        model, structure_points(model, [0, 1, 2, 3]), ids, stages=[stage]
    )
    section = stage.report(stats.extras["experts"], ReportContext(records=[]))
    seen: dict = {}
    handles = [
        ex.down.register_forward_hook(lambda m, a, o, key=(i, e): seen.setdefault(key, []).append((a[0], o)))
        for i, layer in enumerate(model.layers)
        for e, ex in enumerate(layer.mlp.experts)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    units = {(u["layer"], u["expert"]): u for u in section["units"]}
    assert set(units) == {(i, e) for i in range(4) for e in range(8)}
    assert all(u["kind"] == "routed" for u in units.values())
    for key, u in units.items():
        if key not in seen:
            assert u["tokens"] == 0 and u["max_output"] is None
            continue
        h = torch.cat([a for a, _ in seen[key]]).numpy()
        y = torch.cat([o for _, o in seen[key]]).numpy()
        assert u["tokens"] == len(y), key
        assert (u["max_output"], u["max_output_dim"]) == (float(np.abs(y).max()), int(np.abs(y).max(0).argmax())), key
        assert (u["max_input"], u["max_input_channel"]) == (float(np.abs(h).max()), int(np.abs(h).max(0).argmax())), key
        counts = (np.abs(y) >= 6.0).sum(0)
        top = sorted(((int(c), d) for d, c in enumerate(counts) if c), key=lambda t: (-t[0], t[1]))[:5]
        assert [(o["count"], o["dim"]) for o in u["outlier_dims"]] == top, key
        assert u["max_output_at"] == {"token_index": None}, key
    assert [(s["layer"], s["expert"]) for s in section["super_experts"]] == [(2, 5)]


def test_report_names_a_shared_expert_by_its_index_and_a_unit_that_never_ran_by_none():
    """Crafted statistics through the report: a routed row is named by its expert, a second shared
    expert by its index among the layer's shared experts; a unit whose largest output is exactly 0 ran
    (0.0, with its place), one that never ran (-1) reports None for both maxima and no place; a
    maximum at a token the experts implementation did not reveal has no sequence or position; a MoE
    layer whose routed experts saw no token is listed as unobserved."""
    from types import SimpleNamespace

    from outlier_hydra.stages import ReportContext
    from outlier_hydra.stages.experts import UNKNOWN_TOKEN, Experts, ExpertStats

    def col(*values, dtype=np.int64):
        return np.asarray(values, dtype)

    stats = ExpertStats(
        keys=col([0, 0, 0, 2], [0, 1, 1, 0], [1, 2, 0, 0], [2, 0, 0, 0], [3, 2, 0, 0]),
        tokens=col(3, 4, 0, 0, 2),
        out_max=col(5.0, 0.0, -1.0, -1.0, 1.0, dtype=np.float64),
        out_dim=col(1, 0, 0, 0, 0),
        out_token=col(UNKNOWN_TOKEN, 5, 2**62, 2**62, 9),
        col=col(0, 1, 0, 0, 0),
        weight=col(0.5, 0.0, 0.0, 0.0, 1.0, dtype=np.float64),
        contribution=col(1.0, 0.0, 0.0, 0.0, 1.0, dtype=np.float64),
        in_max=col(2.0, 0.0, -1.0, -1.0, 1.0, dtype=np.float64),
        in_channel=col(1, 0, 0, 0, 0),
        in_token=col(1, 0, 2**62, 2**62, 9),
        median_abs_weight=col(0.25, 0.0, 0.25, 0.25, 0.25, dtype=np.float64),
        count_keys=np.zeros((0, 2), np.int64),
        counts=np.zeros(0, np.int64),
        # unit 0: its second row's token unknown (left out); unit 1: one row; the rest none
        top_out=np.asarray([[5.0, 4.0, 3.0], [0.0, -1, -1], [-1, -1, -1], [-1, -1, -1], [1.0, -1, -1]]),
        top_dim=np.asarray([[1, 2, 3], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]),
        top_token=np.asarray([[UNKNOWN_TOKEN, UNKNOWN_TOKEN + 3, 6], [5, 0, 0], [0, 0, 0], [0, 0, 0], [9, 0, 0]]),
    )
    ids = np.arange(8).reshape(2, 4) + 100
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda t: f"<{t}>")
    ctx = ReportContext(records=[], token_ids=ids, tokenizer=tokenizer)
    section = Experts(make_cfg().analysis.stages.experts).report(stats, ctx)
    units = section["units"]
    assert [(u["layer"], u["kind"], u["expert"]) for u in units] == [
        (0, "routed", 2),
        (0, "shared", 1),
        (1, "dense", 0),
        (2, "routed", 0),
        (3, "dense", 0),
    ]
    assert [(u["max_output"], u["max_input"]) for u in units][:4] == [(5.0, 2.0), (0.0, 0.0), (None, None), (None, None)]
    assert ["max_output_at" in u for u in units] == [True, True, False, False, True]
    assert units[0]["max_output_at"] == {"token_index": None}
    at = {"token_index": 5, "sequence": 1, "position": 1, "token_id": 105, "token": "<105>"}
    assert units[1]["max_output_at"] == at
    # a sequence past the token ids at hand (another shard's): its place, no token
    assert units[4]["max_output_at"] == {"token_index": 9, "sequence": 2, "position": 1}
    # the top outputs: those whose token is known, each placed as max_output_at is
    six = {"token_index": 6, "sequence": 1, "position": 2, "token_id": 106, "token": "<106>"}
    assert [u.get("top_outputs") for u in units] == [
        [{"value": 3.0, "dim": 3, **six}],
        [{"value": 0.0, "dim": 0, **at}],
        None,
        None,
        [{"value": 1.0, "dim": 0, "token_index": 9, "sequence": 2, "position": 1}],
    ]
    # the weight's ratio to the median |w|: none where that median is 0
    ratios = [u["super_weight_candidate"]["ratio_to_median_abs_weight"] for u in units if "super_weight_candidate" in u]
    assert ratios == [2.0, None, 4.0]
    assert section["unobserved_layers"] == [2]
    # experts as a list of modules: one unit each; a layer is observed if any of its experts saw a token
    more = {k: np.concatenate([getattr(stats, k), getattr(stats, k)[3:4]]) for k in stats.__dataclass_fields__}
    more["keys"][-1] = [0, 0, 3, 3]  # layer 0's expert 3, after expert 2 (3 tokens): none
    more["count_keys"], more["counts"] = stats.count_keys, stats.counts
    again = Experts(make_cfg().analysis.stages.experts).report(ExpertStats(**more), ctx)
    assert again["unobserved_layers"] == [2]


def test_the_down_projection_bank_is_found_by_name_and_its_layout_by_the_modules_own_flag():
    """_down_bank: the 3-D parameter named down_proj wherever it is registered (not only last); a
    module's own is_transposed decides the layout, the shape only where the module does not say."""
    from outlier_hydra.stages.experts.units import down_bank as _down_bank

    def bank(*shapes, **attrs):
        module = torch.nn.Module()
        for name, shape in shapes:
            setattr(module, name, torch.nn.Parameter(torch.zeros(shape)))
        for k, v in attrs.items():
            setattr(module, k, v)
        return module

    hidden = 4
    assert _down_bank(bank(("down_proj", (3, 4, 6)), ("gate_up_proj", (3, 12, 4))), hidden) == ("down_proj", False)
    assert _down_bank(bank(("gate_up_proj", (3, 12, 4)), ("w2", (3, 6, 4))), hidden) == ("w2", True)  # no name: the last
    assert _down_bank(bank(("down_proj", (3, 4, 4))), hidden) == ("down_proj", False)  # square: the shape cannot tell
    assert _down_bank(bank(("down_proj", (3, 4, 4)), is_transposed=True), hidden) == ("down_proj", True)
    assert _down_bank(bank(("down_proj", (3, 4, 6)), is_transposed=False), hidden) == ("down_proj", False)
    assert _down_bank(torch.nn.Linear(4, 4), hidden) is None


def test_the_watch_reads_grouped_mm_and_bmm_however_the_model_calls_them():
    """_Watch on crafted calls of the fused experts' matmuls: torch._grouped_mm with its offsets by
    position or by keyword, rows past the last offset (choices of no expert here: grouped_mm leaves
    those rows unwritten) marked invalid; torch.bmm with the gathered bank as the first operand or as
    the second. Each hands the stage the rows, their experts and their tokens."""
    from types import SimpleNamespace

    from outlier_hydra.stages.experts.units import Unit as _Unit
    from outlier_hydra.stages.experts.watch import Watch

    calls = []
    stage = SimpleNamespace(_update=lambda unit, x, y, expert, token, valid=None: calls.append((x, y, expert, token, valid)))
    e, inter, hidden = 2, 8, 8
    bank = torch.randn(e, hidden, inter)
    unit = _Unit(0, 0, 0, 0, e, "experts", "down_proj")
    index = torch.tensor([[1, 0], [0, 1], [2, 2]])  # token 2's choices: an expert past this bank
    x = torch.randn(6, inter)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    for positional in (True, False):
        with Watch(functools.partial(stage._update, unit), bank, index):
            w = bank.transpose(-2, -1)
            y = torch._grouped_mm(x, w, offs) if positional else torch._grouped_mm(x, w, offs=offs)
        [(xs, ys, expert, token, valid)] = calls
        calls.clear()
        assert xs is x and ys is y
        assert expert.tolist() == [0, 0, 1, 1, 2, 2] and valid.tolist() == [True] * 4 + [False] * 2
        assert (
            sorted(token[:2].tolist()) == [0, 1] and sorted(token[2:4].tolist()) == [0, 1] and token[4:].tolist() == [2, 2]
        )

    def grouped_mm(x, w, offs):  # a torch whose public grouped_mm reaches the mode by that name
        return torch._grouped_mm(x, w, offs=offs)

    watch = Watch(functools.partial(stage._update, unit), bank, index)
    y = grouped_mm(x, bank.transpose(-2, -1), offs)
    watch._read(grouped_mm, (x, bank.transpose(-2, -1), offs), {}, y)
    [(xs, ys, expert, token, valid)] = calls
    calls.clear()
    assert xs is x and ys is y and expert.tolist() == [0, 0, 1, 1, 2, 2] and valid.tolist() == [True] * 4 + [False] * 2

    ids = torch.tensor([0, 1, 1])
    rows = torch.randn(3, inter)
    expected = torch.stack([bank[i] @ r for i, r in zip(ids, rows)])
    flipped = bank.transpose(1, 2).contiguous()  # an [E, I, H] bank: the rows multiply it from the left
    for b, call in ((bank, lambda g: torch.bmm(g, rows[:, :, None])), (flipped, lambda g: torch.bmm(rows[:, None, :], g))):
        with Watch(functools.partial(stage._update, unit), b, index[:, :1]):
            out = call(b[ids])
        [(xs, ys, expert, token, valid)] = calls
        calls.clear()
        assert torch.equal(xs, rows) and torch.allclose(ys, expected, atol=1e-5) and out.numel() == ys.numel()
        assert expert.tolist() == [0, 1, 1] and token.tolist() == [0, 1, 2] and valid is None


def test_the_watch_names_an_eager_experts_tokens_only_when_its_rows_are_the_choices_of_it():
    """Eager: F.linear on one expert's slice of the bank. Its rows are the tokens that chose it, in
    transformers' order (by slot, then token), when their number is the choices' count; rows of any
    other number (an implementation that pads or drops) give no tokens (None: the maximum is kept
    without its position) rather than wrong ones."""
    from types import SimpleNamespace

    from outlier_hydra.stages.experts.units import Unit as _Unit
    from outlier_hydra.stages.experts.watch import Watch

    calls = []
    stage = SimpleNamespace(_update=lambda unit, x, y, expert, token, valid=None: calls.append((expert, token)))
    bank = torch.randn(3, 4, 5)  # [E, H, I]: F.linear(h, W[e])
    unit = _Unit(0, 0, 0, 0, 3, "experts", "down_proj")
    index = torch.tensor([[1, 2], [0, 1], [1, 0]])  # expert 1: token 0 (slot 0), token 2 (slot 0), token 1 (slot 1)
    for rows, want in ((3, [0, 2, 1]), (2, None), (4, None)):
        with Watch(functools.partial(stage._update, unit), bank, index):
            torch.nn.functional.linear(torch.randn(rows, 5), bank[1])
        [(expert, token)] = calls
        calls.clear()
        assert expert.tolist() == [1] * rows and (token if token is None else token.tolist()) == want, rows


def test_the_watch_takes_grouped_mm_order_from_the_models_own_sort():
    """grouped_mm_experts_forward sorts the flat choices itself: the watch keeps that sort's result
    (values and permutation, stable or not: the model's own order) instead of sorting again. A sort of
    anything else, or one asked to descend, is not taken for it; without one the watch sorts the
    choices itself."""
    from types import SimpleNamespace

    from outlier_hydra.stages.experts.units import Unit as _Unit
    from outlier_hydra.stages.experts.watch import Watch

    calls = []
    stage = SimpleNamespace(_update=lambda unit, x, y, expert, token, valid=None: calls.append((expert, token)))
    bank = torch.randn(3, 4, 4)
    unit = _Unit(0, 0, 0, 0, 3, "experts", "down_proj")
    index = torch.tensor([[2, 0], [0, 1], [1, 2]])
    x, offs = torch.randn(6, 4), torch.tensor([2, 4, 6], dtype=torch.int32)
    for model_sort in ("function", "method", "stable", "by position", "descending", "descending by position", "other", None):
        with Watch(functools.partial(stage._update, unit), bank, index) as watch:
            flat = index.reshape(-1)
            own = {
                "function": lambda: torch.sort(flat),
                "method": lambda: flat.sort(),
                "stable": lambda: torch.sort(flat, stable=True, dim=0),
                "by position": lambda: torch.sort(flat, 0, False),
                "descending": lambda: torch.sort(flat, descending=True),
                "descending by position": lambda: flat.sort(0, True),
                "other": lambda: torch.sort(flat.clone()),
                None: lambda: None,
            }[model_sort]()
            torch._grouped_mm(x, bank.transpose(-2, -1), offs)
        [(expert, token)] = calls
        calls.clear()
        taken = model_sort in ("function", "method", "stable", "by position")
        assert watch.sorted is (own if taken else None), model_sort
        assert (own is not None and expert.data_ptr() == own.values.data_ptr()) is taken, model_sort
        assert expert.tolist() == [0, 0, 1, 1, 2, 2] and sorted(token.tolist()) == [0, 0, 1, 1, 2, 2]
        assert [int(index[t, (index[t] == e).nonzero()[0, 0]]) for t, e in zip(token, expert)] == expert.tolist()


def test_the_experts_hook_takes_the_choices_from_the_argument_the_probe_named():
    """_enter: the choices from the argument the probe found them in (index_at), not the first
    integer tensor (a decoy before them), and flattened to [tokens, k] from [batch, seq, k]."""
    from types import SimpleNamespace

    from outlier_hydra.stages.experts import Experts
    from outlier_hydra.stages.experts.units import Unit as _Unit

    stage = Experts(make_cfg().analysis.stages.experts)
    stage.structure = SimpleNamespace(moe=lambda layer: SimpleNamespace(choices="experts", index_at=2))
    stage.watches = []
    module = torch.nn.Module()
    module.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))
    unit = _Unit(0, 0, 0, 0, 2, "experts", "down_proj")
    decoy = torch.zeros(3, 5, dtype=torch.long)
    choices = torch.tensor([[[1, 0], [0, 1], [1, 1]]])
    stage._enter(unit)(module, (torch.zeros(1, 3, 4), decoy, choices), {})
    try:
        assert torch.equal(stage.watches[-1].index, choices.reshape(3, 2))
    finally:
        stage.end_pass()
    assert stage.watches == []


def test_a_unit_run_twice_in_a_pass_keeps_each_maximums_record_as_the_merge_does():
    """_accumulate (a unit's experts run twice in one pass): per expert the larger maximum wins with
    its whole record; at an equal maximum the earlier token wins, and at an equal token the first
    record stays (ExpertStats.merge's rule); a smaller maximum at an earlier token does not win.
    The same for the input maximum; tokens and counts add; the top outputs are the largest of both
    (equal values: the earlier token), each with its dim."""
    from outlier_hydra.stages.experts.tensors import accumulate
    from outlier_hydra.stages.experts.units import Unit as _Unit

    def record(out_max, out_token, in_max, in_token, tag, top=((-1.0, -1.0),) * 4, top_token=((0, 0),) * 4):
        n = len(out_max)
        return {
            "top_out": torch.as_tensor(top),
            "top_dim": torch.full((n, 2), tag),
            "top_token": torch.as_tensor(top_token),
            "tokens": torch.ones(n, dtype=torch.long),
            "out_max": torch.tensor(out_max),
            "out_dim": torch.full((n,), tag),
            "out_token": torch.tensor(out_token),
            "col": torch.full((n,), tag),
            "weight": torch.full((n,), float(tag)),
            "contribution": torch.full((n,), float(tag)),
            "in_max": torch.tensor(in_max),
            "in_channel": torch.full((n,), tag),
            "in_token": torch.tensor(in_token),
            "counts": torch.ones(n, 3, dtype=torch.long),
        }

    unit = _Unit(0, 0, 0, 0, 4, "experts", "down_proj")
    # experts: 0 larger, 1 equal and earlier, 2 equal at the same token, 3 smaller but earlier
    big = torch.iinfo(torch.long).max
    first_top = ((5.0, 1.0), (5.0, 4.0), (-1.0, -1.0), (3.0, -1.0))
    first_tokens = ((4, 2), (4, 7), (big, big), (2, big))
    second_top = ((6.0, 5.0), (5.0, 4.0), (2.0, 1.0), (-1.0, -1.0))
    second_tokens = ((9, 8), (3, 1), (5, 6), (big, big))
    unit.acc = accumulate(
        unit.acc, record([5.0, 5.0, 5.0, 5.0], [4, 4, 4, 4], [2.0, 2.0, 2.0, 2.0], [4, 4, 4, 4], 1, first_top, first_tokens)
    )
    unit.acc = accumulate(
        unit.acc,
        record([6.0, 5.0, 5.0, 4.0], [9, 3, 4, 1], [3.0, 2.0, 2.0, 1.0], [9, 3, 4, 1], 2, second_top, second_tokens),
    )
    acc = unit.acc
    assert acc["top_out"].tolist() == [[6.0, 5.0], [5.0, 5.0], [2.0, 1.0], [3.0, -1.0]]
    assert acc["top_token"].tolist() == [[9, 4], [3, 4], [5, 6], [2, big]]
    assert acc["top_dim"].tolist() == [[2, 1], [2, 1], [2, 2], [1, 1]]
    assert acc["out_max"].tolist() == [6.0, 5.0, 5.0, 5.0] and acc["out_token"].tolist() == [9, 3, 4, 4]
    for key in ("out_dim", "col", "weight", "contribution", "in_channel"):
        assert acc[key].tolist() == [2, 2, 1, 1], key
    assert acc["in_max"].tolist() == [3.0, 2.0, 2.0, 2.0] and acc["in_token"].tolist() == [9, 3, 4, 4]
    assert acc["tokens"].tolist() == [2] * 4 and acc["counts"].tolist() == [[2] * 3] * 4
    # wide tops with ties everywhere (sorts of 16 or fewer run stable by chance): numpy's stable order
    g = torch.Generator().manual_seed(2)
    first, second = [
        record([1.0] * 3, [0] * 3, [1.0] * 3, [0] * 3, 1, torch.randint(0, 3, (3, 20), generator=g).float(), tok)
        for tok in torch.randperm(120, generator=g).view(2, 3, 20)
    ]
    for side in (first, second):
        side["top_dim"] = torch.randint(0, 50, (3, 20), generator=g)
    both = {k: np.concatenate([first[k].numpy(), second[k].numpy()], 1) for k in ("top_out", "top_dim", "top_token")}
    wide = _Unit(0, 0, 0, 0, 3, "experts", "down_proj")
    wide.acc = accumulate(wide.acc, first)  # (first becomes the unit's record, updated in place)
    wide.acc = accumulate(wide.acc, second)
    order = np.lexsort((both["top_token"], -both["top_out"]), axis=1)[:, :20]
    for k, v in both.items():
        assert np.array_equal(wide.acc[k].numpy(), np.take_along_axis(v, order, 1)), k
