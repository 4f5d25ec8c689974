"""The per-tensor reductions alone, on one CUDA device: what each costs per hooked tensor.

    python scripts/reduce_bench.py [--rows 8192] [--cols 2048] [--dtype bfloat16] [--tune]

On one hooked tensor of the given shape (normal values, three outlier dims at 20x, as a layer norm's
output), it prints for each reduction the time per call when calls follow each other (the device's
time, or the host's where launching is slower) and the host's time to launch one call alone, next to
x.sum() (one read of x: the floor). Then the experts stage's reads of one MoE layer (torch ops and
the Triton kernel). Then the end of a batch (32 hooked tensors, the host copy) for
the compiled and the Triton reductions, and one end of a batch profiled op by op (where its time goes,
how often the host waits). Each Triton launch shape is checked bit for bit against the
dense reduction before it is timed; --tune tries several and prints the fastest as
OUTLIER_HYDRA_TRITON_BLOCKS=rows,cols,programs,warps,elementwise (the best also goes to $OUT_BLOCKS if set),
and tries the experts kernel's tiles (rows x cols x warps; each checked against the torch ops first).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from outlier_hydra.collect import fused_triton
from outlier_hydra.collect.backends import BACKENDS
from outlier_hydra.collect.batch_state import BatchState
from outlier_hydra.collect.reductions import compiled_reduce, dense_reduce, edges_on
from outlier_hydra.errors import first_line
from outlier_hydra.stages.experts.tensors import rows_torch
from outlier_hydra.stats import DEFAULT_EDGES, histogram_edges
from outlier_hydra.tools.benchmark import sync


def timed(fn, device: torch.device, reps: int = 50) -> tuple[float, float]:
    """(seconds per call back to back, seconds of host time to launch one call while the GPU is busy;
    NaN where that could not be measured)."""
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    per_call = (time.perf_counter() - start) / reps
    if device.type != "cuda":
        return per_call, per_call
    return per_call, launch_time(fn, reps)


def launch_time(fn, reps: int, sleep_cycles: int = int(3e8)) -> float:
    """Host seconds to launch one call of fn behind a GPU kept busy by a sleep kernel. Valid only
    while the sleep outlasts the launching: once about a thousand launches are pending, the next
    one waits for the GPU, and the figure would be the device's time, not the host's (a call of 65
    kernels, 50 times, is 3,250). An event recorded right after the sleep tells: done by the end of
    the loop means the loop waited; then fewer calls, down to one (NaN: even one outlasts it)."""
    while True:
        torch.cuda._sleep(sleep_cycles)
        slept = torch.cuda.Event()
        slept.record()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        launch = (time.perf_counter() - start) / reps
        waited = slept.query()
        torch.cuda.synchronize()
        if not waited:
            return launch
        if reps == 1:
            return float("nan")
        reps = max(1, reps // 4)


def check(x, edges_t, blocks) -> None:
    pabs, pval = torch.zeros_like(x), torch.zeros_like(x)
    ge, amax, bad, pabs, pval = dense_reduce(x, pabs, pval, edges_t)
    mine = torch.zeros_like(x)
    ge2, amax2, bad2 = fused_triton.reduce(x, mine, edges_t, blocks)
    same = torch.equal(ge, ge2.long()) and torch.equal(amax.float(), amax2) and int(bad) == int(bad2)
    if not (same and torch.equal(pval, mine)):
        raise AssertionError(f"triton {blocks} differs from the dense reduction")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: the script itself checked (TRITON_INTERPRET=1)")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols, device=device).to(getattr(torch, args.dtype))
    x[:, [7, args.cols // 2 + 3, args.cols - 5]] *= 20
    edges_t = edges_on(tuple(histogram_edges(DEFAULT_EDGES, 6.0)), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, x [{args.rows}, {args.cols}] {args.dtype}, {edges_t.numel()} edges")
    print(f"{'reduction':46s} {'us/call':>8s} {'launch us':>9s}")

    def show(name, fn):
        per_call, launch = timed(fn, device, args.reps)
        print(f"{name:46s} {per_call * 1e6:8.1f} {launch * 1e6:9.1f}", flush=True)
        return per_call

    show("x.sum() (one read of x)", lambda: x.sum())
    pabs, pval = torch.zeros_like(x), torch.zeros_like(x)
    show("dense", lambda: dense_reduce(x, pabs, pval, edges_t))
    show("compiled", lambda: compiled_reduce(x, pabs, pval, edges_t))
    candidates = [fused_triton.Blocks.default()]
    if args.tune:  # around the H200's fastest of 2026-11-28 (64,32,8,4), each with 0, 1 and 2 edges per element
        candidates += [
            fused_triton.Blocks(rows, cols, programs, warps, elementwise)
            for rows, cols, programs, warps in [
                (64, 32, 8, 4), (128, 32, 8, 4), (64, 32, 16, 4), (64, 32, 8, 2), (32, 32, 8, 4),
                (64, 64, 8, 4), (128, 64, 8, 8),
            ]
            for elementwise in (0, 1, 2)
        ]  # fmt: skip
    best = None
    for blocks in candidates:
        try:
            check(x, edges_t, blocks)
        except Exception as exc:  # noqa: BLE001 - a launch shape that does not build is skipped
            print(f"triton {blocks}: {type(exc).__name__}: {first_line(exc, 120)}")
            continue
        mine = torch.zeros_like(x)
        per_call = show(
            f"triton {blocks}",
            lambda blocks=blocks, mine=mine: fused_triton.reduce(x, mine, edges_t, blocks),
        )
        if best is None or per_call < best[0]:
            best = (per_call, blocks)
    if best is not None:
        print(f"fastest: OUTLIER_HYDRA_TRITON_BLOCKS={best[1]}")
        if os.environ.get("OUT_BLOCKS"):
            with open(os.environ["OUT_BLOCKS"], "w") as f:
                f.write(f"{best[1]}\n")

    # the experts stage's reads of one MoE layer's down projection: olmoe_shape routes 8 x 8192 rows
    # of [2048] out of [1024] through 64 experts, sorted by expert as grouped_mm does
    routed = 8 * args.rows
    g = torch.Generator(device=device).manual_seed(1)
    y = torch.randn(routed, args.cols, device=device, generator=g).to(x.dtype)
    inner = torch.randn(routed, args.cols // 2, device=device, generator=g).to(x.dtype)
    expert = torch.randint(0, 64, (routed,), device=device, generator=g).sort().values
    valid = torch.ones(routed, dtype=torch.bool, device=device)

    token = torch.randperm(routed, device=device, generator=g) // 8  # grouped_mm's tokens: each 8 times

    def experts_torch():
        return rows_torch(inner, y, expert, token, valid, 64, True, 6.0)

    print(f"experts, one layer: y [{routed}, {args.cols}], x [{routed}, {args.cols // 2}], 64 experts")
    show("experts: torch ops (|y|, maxima, one-hot counts)", experts_torch)
    if fused_triton.available(device.type):
        want = vars(experts_torch()).values()
        tiles = [None]
        if args.tune:  # rows, cols, warps of the first kernel's programs
            tiles += [(16, 256, 4), (16, 256, 8), (32, 256, 8), (8, 512, 4), (16, 512, 8), (32, 128, 4), (64, 128, 8)]
        fastest = None
        for tile in tiles:
            label = "x".join(
                map(str, tile or (fused_triton.EXPERT_ROWS, fused_triton.EXPERT_COLS, fused_triton.EXPERT_WARPS))
            )
            got = fused_triton.expert_rows(y, inner, expert, token, valid, 6.0, 64, tile)
            if not all(torch.equal(a, b) for a, b in zip(want, vars(got).values(), strict=True)):
                raise AssertionError(f"expert_rows {label} differs from the torch ops")
            per_call = show(
                f"experts: triton expert_rows {label}",
                lambda tile=tile: fused_triton.expert_rows(y, inner, expert, token, valid, 6.0, 64, tile),
            )
            if fastest is None or per_call < fastest[0]:
                fastest = (per_call, label)
        if fastest is not None and args.tune:
            print(f"fastest experts tile (rows x cols x warps): {fastest[1]}")
    show("y.abs().amax(1) (one read of y, one write)", lambda: y.abs().amax(1))

    modules = 32
    names = [f"m{i}" for i in range(modules)]
    for backend in ("compiled", "triton"):

        def batch(backend=backend):
            state = BatchState(histogram_edges(DEFAULT_EDGES, 6.0), 5, modules, BACKENDS[backend]())
            for row in range(modules):
                state.update(row, x)
            return state

        state = batch()
        show(f"{backend}: {modules} tensors (hooks only)", batch)
        state.to_host(names, 6.0)  # the first call compiles the counting kernel, allocates pinned memory
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            state.to_host(names, 6.0)
        print(f"{backend + ': end of batch (to_host)':46s} {(time.perf_counter() - start) / 5 * 1e6:8.1f}", flush=True)
    end_of_batch_profile(lambda: state.to_host(names, 6.0), device)


def end_of_batch_profile(fn, device: torch.device, rows: int = 12) -> None:
    """Where the last end of a batch (the Triton reduction's) spends its time: one call profiled,
    the ops by their own device time (host time on the CPU), and how often the host waited."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    on_device = device.type == "cuda"
    own = [(e.key, e.count, (e.self_device_time_total if on_device else e.self_cpu_time_total)) for e in events]
    waits = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy"))
    total = sum(us for _, _, us in own)  # own times: nothing counted twice
    print(
        f"end of batch profiled: {wall * 1e6:.0f} us wall (with the profiler), {total:.0f} us of "
        f"{'device' if on_device else 'host'} time in ops, {waits} host waits; by op:"
    )
    for key, count, us in sorted(own, key=lambda t: -t[2])[:rows]:
        print(f"  {key[:60]:60s} {count:5d} x {us:9.1f} us")


if __name__ == "__main__":
    main()
