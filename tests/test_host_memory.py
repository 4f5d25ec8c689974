"""Freed host memory kept for reuse on CPU runs (collect/host_memory.py): what it changes, and that
runs and benchmarks on the CPU turn it on unless retain_host_memory=false."""

import subprocess
import sys

import pytest
import torch
from conftest import make_cfg, tiny_overrides

FAULTS = """
import resource, sys, torch
from outlier_hydra.cli import compose_config
from outlier_hydra.tools.benchmark import prepare
device, model, points, stages, ids = prepare(compose_config(["benchmark=cpu_mid", "retain_host_memory=" + sys.argv[1]]))
with torch.inference_mode():
    for _ in range(2):
        model(input_ids=ids)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(input_ids=ids)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_a_forward_reuses_freed_blocks_instead_of_faulting_them_in_again():
    """Three forwards of benchmark=cpu_mid's model (after two): with glibc's defaults its freed
    activations go back to the OS and come back page by page (about 85,000 page faults here); kept,
    a small fraction of that (about 4,000)."""
    faults = {}
    for retain in ("false", "true"):
        out = subprocess.run([sys.executable, "-c", FAULTS, retain], capture_output=True, text=True, check=True)
        faults[retain] = int(out.stdout.strip().splitlines()[-1])
    assert faults["false"] > 30_000 and faults["true"] * 10 < faults["false"], faults


def test_it_says_whether_it_applied():
    from outlier_hydra.collect.host_memory import retain_freed_memory

    assert retain_freed_memory() is sys.platform.startswith("linux")


def test_a_cpu_run_and_a_cpu_benchmark_turn_it_on_unless_told_not_to(tiny_models, monkeypatch):
    from outlier_hydra.models import load_model_config
    from outlier_hydra.pipeline import job
    from outlier_hydra.tools import benchmark

    calls = []
    monkeypatch.setattr(job, "retain_freed_memory", lambda: calls.append("run"))
    monkeypatch.setattr(benchmark, "retain_freed_memory", lambda: calls.append("benchmark"))
    for retain in (True, False):
        cfg = make_cfg(*tiny_overrides(tiny_models["olmoe"]), "model.device_map=cpu", f"retain_host_memory={retain}")
        model_type = load_model_config(cfg.model).model_type
        model, device = job.LazyModel(cfg, model_type).get()
        assert device == torch.device("cpu")
        benchmark.prepare(make_cfg("benchmark=cpu_tiny", f"retain_host_memory={retain}"))
        assert calls == (["run", "benchmark"] if retain else []), retain
        calls.clear()
