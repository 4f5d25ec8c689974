"""Where a collection's time goes, stage by stage, on one benchmark preset:

    python scripts/stage_breakdown.py benchmark=olmoe_shape [more overrides]

On the preset's model and batch (as `outlier-hydra benchmark`), with the whole forward run, it times
(medians over `repeats`, interleaved): the bare forward, the collection with no stage, with each
collect stage alone and with all of them, and prints each as x forward. Then, for each of these
collections, its time by the project's function that asked for it (device time on a GPU; the
model's own ops one row), the device time of a forward and of a collection with all stages, that
collection's ops by device and by host time (torch.profiler), and the places where it makes the
host wait for the GPU (torch's sync debug mode).
This is the diagnosis behind a benchmark ratio; the ratios themselves are the benchmark's.
"""

from __future__ import annotations

import collections
import re
import statistics as st
import sys
import traceback
import warnings
from pathlib import Path

import torch

from outlier_hydra.config.targets import instantiate_node
from outlier_hydra.tools.args import compose_config
from outlier_hydra.tools.benchmark import prepare, sync, timed


def main(overrides: list[str]) -> None:
    cfg = compose_config(overrides)
    b = cfg.benchmark
    device, model, points, stages, ids = prepare(cfg)
    allowed = list(cfg.allowed_targets)
    collector = instantiate_node(cfg.analysis.collector, "analysis.collector", allowed, early_stop=False)

    def forward():
        with torch.inference_mode():
            model(input_ids=ids)

    def collect(chosen):
        return lambda: collector.collect_batch(model, points, ids, stages=chosen)

    variants = {"forward": forward, "no stage": collect([])}
    variants.update({s.name: collect([s]) for s in stages})
    variants["all stages"] = collect(stages)
    for fn in variants.values():
        timed(fn, device, 0, b.warmup)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(b.repeats):
        for k, fn in variants.items():
            times[k] += timed(fn, device, 1, 0)
    fwd = st.median(times["forward"])
    print(f"{b.name} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, whole forward:")
    for k, v in times.items():
        print(f"  {k:<22}{st.median(v):>10.4f} s{st.median(v) / fwd:>9.3f}x")

    forward_profile, collection_profile = profile(forward, device), profile(variants["all stages"], device)
    for name in [k for k in variants if k != "forward"]:
        print_time_by_function(variants[name], device, name)
    averages = collection_profile.key_averages()
    if device.type == "cuda":  # the kernels and copies themselves (an op's row repeats its kernels' time)
        device_ms = [
            sum(e.self_device_time_total for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
            for p in (forward_profile, collection_profile)
        ]
        print(f"device time: forward {device_ms[0]:.1f} ms, collection with all stages {device_ms[1]:.1f} ms")
        print(averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
        print_sync_sites(variants["all stages"], device)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def profile(fn, device, with_stack: bool = False):
    """One call of fn under torch.profiler (the GPU's kernels too on CUDA), waited for."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # verbose: the Python frames are linked to the ops only with it where Kineto profiles a CUDA device
    # (pytorch/pytorch#100253; with_stack alone gave no frame at all on an H200, torch 2.11+cu130)
    config = torch._C._profiler._ExperimentalConfig(verbose=True) if with_stack else None
    with torch.profiler.profile(activities=activities, with_stack=with_stack, experimental_config=config) as prof:
        fn()
        sync(device)
    return prof


FRAME = re.compile(r"^(?P<file>.+\.py)\((?P<line>\d+)\): (?P<function>.+)$")  # the profiler's Python events
LIBRARIES = ("torch/", "triton/", "<built-in")
PASS_THROUGH = ("__torch_function__",)  # the experts stage's mode: the model's ops pass through it


def _library(name: str) -> bool:
    """A frame of torch or triton (the profiler's events name them from site-packages on, a recorded
    stack by the whole path), or a built-in."""
    return name.startswith(LIBRARIES) or any(f"-packages/{lib}" in name for lib in LIBRARIES[:2])


def _frames(event) -> list[str]:
    """The names above an op: the op and its parents (the profiler's Python events among them), then
    its recorded stack, innermost first (where the profiler links no Python event to the op)."""
    stack, names = list(getattr(event, "stack", None) or []), []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names + stack


def function_of(event) -> str | None:
    """The project's function an op comes from: the innermost Python frame outside torch and triton
    (the profiler names a frame by its function's first line), if it is the project's; None for the
    model's own ops."""
    for name in _frames(event):
        frame = FRAME.match(name)
        if frame and not _library(name) and frame["function"] not in PASS_THROUGH:
            at = frame["file"].rfind("outlier_hydra/")
            return name[at:] if at >= 0 else None
    return None


def has_frames(prof) -> bool:
    """Whether any op of the profile is linked to a Python frame (parent or recorded stack)."""
    return any(
        any(FRAME.match(name) for name in _frames(event))
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("aten::")
    )


def print_time_by_function(fn, device, name: str, rows: int = 20) -> None:
    """One collection's time by the project's function that asked for it: on CUDA the device time of
    the kernels each op launched, on the CPU the ops' own time. What a stage costs, function by
    function; the model's own ops are one row, for scale."""
    cuda = device.type == "cuda"
    prof = profile(fn, device, with_stack=True)
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            where = function_of(event) or "(the model's own ops)"
            spent[where] += us
            calls[where] += 1
    total = sum(spent.values())
    if cuda:  # kernels launched outside torch's ops (the Triton reductions) belong to no op's time
        kernels = sum(e.self_device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        if kernels > total:
            spent["(kernels launched outside torch ops: the Triton reductions)"] = kernels - total
            total = kernels
    print(f"{name}: {'device' if cuda else 'CPU'} time by function, {total / 1e3:.1f} ms in all")
    if not has_frames(prof):  # seen on an H200 with torch 2.11: every op would read as the model's own
        print("  (no op is linked to a Python frame in this profile: the split by function is not available here)")
    for where, us in spent.most_common(rows):
        print(f"  {us / 1e3:>9.2f} ms {100 * us / total:>5.1f}% {calls[where]:>6} events  {where}")


def print_sync_sites(fn, device) -> None:
    """Where one collection makes the host wait for the GPU (torch's sync debug mode), by call site."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "outlier_hydra" in f.filename or "transformers" in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-1:-4:-1]) or "(no project frame)"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"host syncs in one collection: {sum(sites.values())}, by site:")
    for site, n in sites.most_common(25):
        print(f"  {n:>5}  {site}")


if __name__ == "__main__":
    main(sys.argv[1:])
