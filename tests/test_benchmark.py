"""The benchmark runs end to end (tiny CPU preset) and writes what it promises; and, where a GPU is
visible, the GPU reductions give the reference's statistics there. Correctness only: no timings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_cfg
from doubles import structure_points

from outlier_hydra.collect import OutlierCollector


def test_benchmark_cpu_tiny_end_to_end(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/benchmark.py",
            "benchmark=cpu_tiny",
            "benchmark.memory_tokens=[512,2048]",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    for key in (
        "forward_s",
        "collect_s",
        "baseline_s",
        "ratio_collect_over_forward",
        "ratio_collect_no_stage_over_forward",
        "ratio_baseline_over_forward",
        "forward_tokens_per_s",
        "peak_host_rss_mb",
    ):
        assert result[key] > 0, key
    assert result["tokens"] == 2 * 64 and result["hooked_modules"] == 8 and result["collector_backend"] == "fused"
    assert [m["tokens"] for m in result["memory_scaling"]] == [512, 2048]
    assert "(b) outlier_hydra" in proc.stdout and "(c) copy-to-host tool" in proc.stdout
    assert (
        result["chunk_layers"] == 1 and result["ratio_collect_chunked_over_forward"] > 0 and "same, chunked" in proc.stdout
    )
    # every ratio: the median over its pairs of collection / the forward beside it, recomputed here,
    # inside its 95% interval; the forward's median over all pairs
    kinds = {
        "collect": "ratio_collect_over_forward",
        "full_forward": "ratio_collect_full_forward_over_forward",
        "chunked": "ratio_collect_chunked_over_forward",
        "no_stage": "ratio_collect_no_stage_over_forward",
    }
    assert set(result["pairs"]) == set(kinds)
    for kind, key in kinds.items():
        pair = result["pairs"][kind]
        assert len(pair["s"]) == len(pair["forward_s"]) == result["repeats"] > 1
        want = float(np.median(np.array(pair["s"]) / np.array(pair["forward_s"])))
        lo, hi = result[f"{key}_ci95"]
        assert result[key] == pytest.approx(want, rel=1e-12) and lo <= want <= hi, kind
    forwards = [f for p in result["pairs"].values() for f in p["forward_s"]]
    assert result["forward_s"] == pytest.approx(float(np.median(forwards)), rel=1e-12)
    assert "95% interval" in proc.stdout


def test_no_preset_is_one_line_naming_every_preset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", "benchmark", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    presets = sorted(p.stem for p in (REPO / "conf" / "benchmark").glob("*.yaml"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.strip().endswith("benchmark=" + " | ".join(presets))
    assert len(presets) == 7 and "mixtral_shape" in presets


def test_pairs_keep_each_time_beside_its_forward_whatever_the_order():
    """The timing loop: each kind's times and the forwards beside them stay apart although the order
    inside a pair alternates (sleeps of 1 ms and 20 ms: far apart whatever the machine's noise)."""
    import time

    from outlier_hydra.tools.benchmark import time_pairs

    calls: list[str] = []

    def fake(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    kinds = {"a": fake("a", 0.02), "b": fake("b", 0.02)}
    pairs = time_pairs(fake("forward", 0.001), kinds, torch.device("cpu"), 4)
    for kind in kinds:
        assert len(pairs[kind]["s"]) == len(pairs[kind]["forward_s"]) == 4
        assert min(pairs[kind]["s"]) > 0.015 > 0.01 > max(pairs[kind]["forward_s"]), kind
    # repeat 0: forward, a, forward, b; repeat 1 (rotated, reversed pairs): b, forward, a, forward
    assert calls[:8] == ["forward", "a", "forward", "b", "b", "forward", "a", "forward"]


def test_paired_ratio_is_the_median_of_the_pairs_with_its_interval():
    from outlier_hydra.tools.benchmark import paired_ratio

    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0, 2.0)
    ratio, lo, hi = paired_ratio([1.0, 1.1, 1.2, 9.0, 1.05], [1.0] * 5)  # one slow spell: not the median
    assert ratio == 1.1 and 1.0 <= lo <= ratio <= hi <= 9.0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU path is checked on one)")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_the_reference(dtype, tiny_models):
    from test_collector import _assert_identical
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["qwen3_moe"], dtype=dtype).cuda().eval()
    ids = torch.randint(1000, 20000, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    points = structure_points(model, [0, 1, 2, 3])
    reference = OutlierCollector(6.0, 5, None, backend="dense").collect_batch(model, points, ids)
    for backend in ("compiled", "sparse", "triton"):
        collector = OutlierCollector(6.0, 5, None, backend=backend)
        _assert_identical(collector.collect_batch(model, points, ids), reference)
        assert collector.backend == backend
    assert OutlierCollector(6.0).backend_for(ids.device) == "triton"


def test_gpu_check_script_runs_end_to_end_in_its_cpu_mode(tmp_path):
    """scripts/gpu_check.sh with DEVICE=cpu: the same steps as on a GPU, on a CPU preset."""
    env = {**os.environ, "DEVICE": "cpu", "PRESETS": "cpu_tiny", "RESULTS": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [result] = list(tmp_path.glob("cpu-*.json"))
    doc = json.loads(result.read_text())
    assert doc["mode"] == "cpu" and [r["preset"] for r in doc["runs"]] == ["cpu_tiny"]
    run = doc["runs"][0]
    for key in (
        "ratio_collect_over_forward",
        "ratio_collect_full_forward_over_forward",
        "ratio_collect_chunked_over_forward",
    ):
        assert run[key] > 0, key
    assert "cpu_tiny" in proc.stdout and "chunked" in proc.stdout and str(result) in proc.stdout
    # the stage breakdown: each collection's time by the project's function, the model's ops apart
    # (the experts stage's TorchFunctionMode passes the model's own ops: not the stage's time)
    [breakdown] = list(tmp_path.glob("cpu-*-breakdown_cpu_tiny.log"))
    experts = breakdown.read_text().split("\nexperts: CPU time by function")[1].split("\nall stages:")[0]
    rows = [line.split(" events  ")[1] for line in experts.splitlines() if " events  " in line]
    assert "(the model's own ops)" in rows and "__torch_function__" not in experts
    assert any(r.startswith("outlier_hydra/stages/experts/__init__.py(") and r.endswith("_update") for r in rows)


def test_reduce_bench_checks_every_kernel_against_torch_before_timing_it():
    """scripts/reduce_bench.py on the CPU (Triton's interpreter): the reduction and the experts kernel
    are each compared with the torch ops before they are timed (the script once went on calling the
    experts kernel by an old signature, unseen until a GPU session)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = ["scripts/reduce_bench.py", "--device", "cpu", "--rows", "16", "--cols", "64", "--reps", "1"]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in (
        "triton 128,32,8,4,0",
        "experts: torch ops",
        "experts: triton expert_rows 32x256x4",
        "triton: end of batch",
        "end of batch profiled:",
    ):
        assert line in proc.stdout, line


def test_card_names_in_result_files():
    from outlier_hydra.tools.benchmark_results import card_slug

    assert card_slug("NVIDIA H200") == "nvidia-h200" and card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert card_slug("cpu (2 threads)") == "cpu"


@pytest.mark.parametrize("preset", ["olmoe_shape", "qwen3_shape", "gpt_oss_20b_shape", "mixtral_shape"])
def test_gpu_presets_build_and_fit_one_80gb_card(preset):
    """Each GPU preset's model is built as the benchmark builds it (here on the meta device: no
    memory), with the preset's layer count, and its bf16 weights fit one 80 GB card with room for the
    activations (the presets' promise; qwen3_shape once failed on the GPU box: a config list given as
    a ListConfig)."""
    from outlier_hydra.tools.benchmark import build_model

    b = make_cfg(f"benchmark={preset}").benchmark
    model = build_model(b, torch.device("meta"))
    assert model.config.num_hidden_layers == b.shape.num_hidden_layers == len(model.layers)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    assert b.dtype == "bfloat16" and 10 < weights_gib < 64, weights_gib


def test_stage_breakdown_finds_the_projects_function_from_parents_or_recorded_stack():
    """scripts/stage_breakdown.py: an op's function is the innermost Python frame outside torch and
    triton, from the op's parents or, where the profiler linked none (seen on an H200 with torch
    2.11), from its recorded stack; a profile with no frame at all is said to be so."""
    import importlib.util
    from types import SimpleNamespace as Event

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("stage_breakdown", REPO / "scripts" / "stage_breakdown.py")
    assert spec is not None and spec.loader is not None
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    cpu = torch.autograd.DeviceType.CPU

    frame = Event(name="/w/outlier_hydra/stages/experts.py(356): _update", cpu_parent=None, stack=[])
    mode = Event(name="/w/outlier_hydra/stages/experts.py(181): __torch_function__", cpu_parent=frame, stack=[])
    builtin = Event(name="<built-in method scatter_reduce_ of Tensor object>", cpu_parent=mode, stack=[])
    op = Event(name="aten::scatter_reduce_", cpu_parent=builtin, stack=[], device_type=cpu)
    assert bd.function_of(op) == "outlier_hydra/stages/experts.py(356): _update"
    model = Event(
        name="aten::mm",
        device_type=cpu,
        stack=[],
        cpu_parent=Event(name="/t/modeling_olmoe.py(80): forward", cpu_parent=None),
    )
    assert bd.function_of(model) is None
    torch_frame = "/opt/torch/.venv/lib/python3.12/site-packages/torch/nn/functional.py(10): linear"
    unlinked = Event(name="aten::sort", cpu_parent=None, device_type=cpu, stack=[torch_frame, frame.name])
    assert bd.function_of(unlinked) == "outlier_hydra/stages/experts.py(356): _update"
    # the model's frame under a folder named torch is the model's, not a library's
    model_frame = "/opt/torch/.venv/lib/python3.12/site-packages/transformers/models/olmoe/modeling_olmoe.py(80): forward"
    collect = "/w/outlier_hydra/collect/collector.py(272): _collect"
    assert bd.function_of(Event(name="aten::mm", cpu_parent=None, stack=[torch_frame, model_frame, collect])) is None
    assert bd.has_frames(Event(events=lambda: [op, model])) and bd.has_frames(Event(events=lambda: [unlinked]))
    bare = Event(name="aten::sort", cpu_parent=None, device_type=cpu, stack=[])
    assert bd.function_of(bare) is None and not bd.has_frames(Event(events=lambda: [bare]))
