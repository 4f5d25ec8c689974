"""What collecting the statistics costs over the forward pass the model needs anyway.

    outlier-hydra benchmark benchmark=cpu_mid            (also scripts/benchmark.py)
    outlier-hydra benchmark benchmark=olmoe_shape        (GPU: real shape, random weights)

On one model and one batch of random tokens it times, after `warmup` runs, `repeats` pairs of each
collection and a bare forward run right beside it (the device synchronised around each; the order
inside a pair alternates, and the order of the collections rotates, from one repeat to the next).
A ratio is the median over the pairs of collection / forward, with a 95% bootstrap interval of that
median: a slow spell of the machine slows both halves of a pair, and the interval says how far the
machine's noise leaves the figure uncertain.
  (a) forward   the bare base-model forward
  (b) collect   a full outlier_hydra collection: every stage on by default, the host copy included
                (each pass ends after the last module anything reads, as in a run); timed again
                with the whole forward run, which isolates what the reductions themselves cost, and with
                no stage at all (the outlier statistics alone)
  (c) baseline  the older tool: copy every hooked output to the host, torch.save, reload, analyse
                on the CPU
and prints one table with tokens/s and the ratios b/a and c/a, plus peak device memory and peak
host RSS; everything goes to benchmark.json in the run directory. With `memory_tokens`, it also
streams that many tokens through the collector (merging as a run does) and reports peak RSS and time
per token for each count: memory stays flat and time grows linearly.
"""

from __future__ import annotations

import logging
import resource
import statistics as st
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from outlier_hydra.collect import fused_triton
from outlier_hydra.collect.hooks import attached, on_input
from outlier_hydra.config.targets import instantiate_node
from outlier_hydra.models.facts import facts_of
from outlier_hydra.models.loading import DTYPES
from outlier_hydra.pipeline.plan import ready
from outlier_hydra.pipeline.rundir import write_json
from outlier_hydra.stages import build_stages

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(b: DictConfig, device: torch.device) -> torch.nn.Module:
    """Random weights of the preset's shape, created on the device directly (nothing downloaded)."""
    from transformers import AutoConfig, AutoModel

    # plain lists and dicts: transformers' strict configs refuse a ListConfig
    shape: dict = OmegaConf.to_container(b.shape, resolve=True)  # type: ignore[assignment]
    config = AutoConfig.for_model(b.model_type, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=DTYPES[b.dtype])
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def time_pairs(forward, kinds: dict, device: torch.device, repeats: int) -> dict[str, dict[str, list[float]]]:
    """For each kind, `repeats` pairs (its time, the time of a forward run right beside it): the order
    inside a pair alternates and the order of the kinds rotates from one repeat to the next, so that
    neither what runs first nor what ran before favours one. {kind: {"s": [...], "forward_s": [...]}}."""
    pairs: dict[str, dict[str, list[float]]] = {name: {"forward_s": [], "s": []} for name in kinds}
    names = list(kinds)
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if i % 2 == 0:
                f, t = timed(forward, device, 1, 0)[0], timed(kinds[name], device, 1, 0)[0]
            else:
                t, f = timed(kinds[name], device, 1, 0)[0], timed(forward, device, 1, 0)[0]
            pairs[name]["forward_s"].append(f)
            pairs[name]["s"].append(t)
    return pairs


def paired_ratio(times: list[float], forwards: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """The median of times[i] / forwards[i] over the pairs, and a 95% percentile-bootstrap interval
    of that median (a fixed seed: the same timings give the same interval)."""
    r = np.asarray(times, np.float64) / np.asarray(forwards, np.float64)
    boot = np.median(np.random.default_rng(0).choice(r, (resamples, r.size)), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(r)), float(lo), float(hi)


def copy_to_host_baseline(model, points, ids, threshold: float, folder: Path) -> None:
    """The older tool: every hooked activation to the host and to disk, reloaded, analysed in Python."""
    saved: list[Path] = []

    def hook(name):
        def fn(x):
            path = folder / f"{name}.pt"
            torch.save(x.detach().to("cpu", torch.float32), path)
            saved.append(path)

        return fn

    with attached(model, [on_input(p.module_path, p.at, hook(p.name)) for p in points]), torch.inference_mode():
        model(input_ids=ids)
    any_hit = None
    for path in saved:
        x = torch.load(path)
        a = np.abs(x.reshape(-1, x.shape[-1]).numpy())
        hit = a >= threshold
        hit.sum(0), a.max(0)
        any_hit = hit if any_hit is None else any_hit | hit
    if any_hit is not None:
        any_hit.sum(0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_scaling(model, points, collector, b, device, stages=()) -> list[dict]:
    """Stream N tokens through the collector, merging as a run does; peak RSS and time per token."""
    rows = []
    per_batch = b.batch_size * b.sequence_length
    gen = torch.Generator().manual_seed(1)
    for n in b.memory_tokens:
        batches = max(1, n // per_batch)
        total = None
        t0 = time.perf_counter()
        for _ in range(batches):
            ids = torch.randint(100, b.shape.vocab_size, (b.batch_size, b.sequence_length), generator=gen).to(device)
            s = collector.collect_batch(model, points, ids, stages=stages)
            total = s if total is None else total.merge(s)
        sync(device)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "tokens": batches * per_batch,
                "seconds": seconds,
                "seconds_per_mtok": seconds / (batches * per_batch) * 1e6,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    return rows


def prepare(cfg: DictConfig):
    """The preset's model on its device, made ready as a run makes its model ready (pipeline/plan.py),
    its hook points, the collecting stages that are on by default (or switched on by the overrides)
    and apply to it, and one batch of random tokens: (device, model, points, stages, ids)."""
    b = cfg.benchmark
    model = build_model(b, pick_device(b.device))
    facts = facts_of(model, f"benchmark={b.name}")
    device = ready(cfg, facts, model)
    layers = list(range(facts.num_layers))
    stages = build_stages(cfg.analysis.stages, list(cfg.allowed_targets)).collecting.bound(facts.structure, layers)
    ids = torch.randint(
        100, b.shape.vocab_size, (b.batch_size, b.sequence_length), generator=torch.Generator().manual_seed(0)
    ).to(device)
    return device, model, facts.structure.hook_points(layers), stages, ids


def run_benchmark(cfg: DictConfig, out: Path) -> dict:
    b = cfg.benchmark
    device, model, points, stages, ids = prepare(cfg)
    layers = list(range(b.shape.num_hidden_layers))
    allowed = list(cfg.allowed_targets)
    collector = instantiate_node(cfg.analysis.collector, "analysis.collector", allowed)
    tokens = ids.numel()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def forward():
        with torch.inference_mode():
            model(input_ids=ids)

    def collect():
        collector.collect_batch(model, points, ids, stages=stages)

    full = instantiate_node(cfg.analysis.collector, "analysis.collector", allowed, early_stop=False)

    def collect_full_forward():  # the same reductions with the whole forward run: their own cost
        full.collect_batch(model, points, ids, stages=stages)

    def collect_no_stage():  # the outlier statistics alone (no stage), whole forward
        full.collect_batch(model, points, ids, stages=[])

    chunk = max(1, len(layers) // 4)  # analysis.chunk_layers: a quarter of the layers per chunk
    chunked = instantiate_node(cfg.analysis.collector, "analysis.collector", allowed, chunk_layers=chunk)

    def collect_chunked():
        chunked.collect_batch(model, points, ids, stages=stages)

    timed(forward, device, 0, b.warmup)
    peak_forward = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    timed(collect, device, 0, b.warmup)
    peak_collect = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    kinds = {
        "collect": collect,
        "full_forward": collect_full_forward,
        "chunked": collect_chunked,
        "no_stage": collect_no_stage,
    }
    for fn in list(kinds.values())[1:]:
        timed(fn, device, 0, b.warmup)
    pairs = time_pairs(forward, kinds, device, b.repeats)
    fwd = [f for p in pairs.values() for f in p["forward_s"]]
    col, colf, colc, coln = (pairs[name]["s"] for name in kinds)
    ratios = {name: paired_ratio(p["s"], p["forward_s"]) for name, p in pairs.items()}  # (median, lo, hi)

    def ratio(name: str) -> float:
        return ratios[name][0]

    def ci95(name: str) -> list[float]:
        return list(ratios[name][1:])

    result = {
        "preset": b.name,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": b.dtype,
        "tokens": tokens,
        "hooked_modules": len(points),
        "collector_backend": collector.backend_for(device),
        # the Triton kernel's launch shape (fused_triton.Blocks; $OUTLIER_HYDRA_TRITON_BLOCKS)
        "triton_blocks": str(fused_triton.launch_shape()) if collector.backend_for(device) == "triton" else None,
        "stages": [s.name for s in stages],
        "forward_s": st.median(fwd),
        "collect_s": st.median(col),
        "forward_tokens_per_s": tokens / st.median(fwd),
        "collect_tokens_per_s": tokens / st.median(col),
        "ratio_collect_over_forward": ratio("collect"),
        "ratio_collect_over_forward_ci95": ci95("collect"),
        "collect_full_forward_s": st.median(colf),
        "ratio_collect_full_forward_over_forward": ratio("full_forward"),
        "ratio_collect_full_forward_over_forward_ci95": ci95("full_forward"),
        "chunk_layers": chunk,
        "collect_chunked_s": st.median(colc),
        "ratio_collect_chunked_over_forward": ratio("chunked"),
        "ratio_collect_chunked_over_forward_ci95": ci95("chunked"),
        "collect_no_stage_s": st.median(coln),
        "ratio_collect_no_stage_over_forward": ratio("no_stage"),
        "ratio_collect_no_stage_over_forward_ci95": ci95("no_stage"),
        "repeats": b.repeats,
        "pairs": pairs,
        "peak_device_mem_forward_gb": peak_forward / 2**30 if peak_forward else None,
        "peak_device_mem_collect_gb": peak_collect / 2**30 if peak_collect else None,
    }
    if b.baseline:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            base = timed(
                lambda: copy_to_host_baseline(model, points, ids, collector.magnitude_threshold, Path(tmp)),
                device,
                b.baseline_repeats,
                1,
            )
        result.update({"baseline_s": st.median(base), "ratio_baseline_over_forward": st.median(base) / st.median(fwd)})
    if b.memory_tokens:
        result["memory_scaling"] = memory_scaling(model, points, collector, b, device, stages)
    result["peak_host_rss_mb"] = peak_rss_mb()
    write_json(out / "benchmark.json", result)
    print(table(result))
    return result


def table(r: dict) -> str:
    def row(label: str, seconds: float, key: str, note: str = "") -> str:
        lo, hi = r[f"{key}_ci95"]
        return f"  {label:<22}{seconds:>10.4f}{r['tokens'] / seconds:>12.0f}{r[key]:>11.3f}{f'{lo:.3f}-{hi:.3f}':>14}{note}"

    lines = [
        f"benchmark {r['preset']} on {r['device']}, {r['dtype']}, {r['tokens']} tokens, "
        f"{r['hooked_modules']} hooked modules, collector backend {r['collector_backend']}"
        + (f" ({r['triton_blocks']})" if r.get("triton_blocks") else "")
        + ", "
        f"stages: {', '.join(r['stages']) or 'none'}; {r['repeats']} pairs each",
        f"  {'':<22}{'seconds':>10}{'tokens/s':>12}{'x forward':>11}{'95% interval':>14}",
        f"  {'(a) forward':<22}{r['forward_s']:>10.4f}{r['forward_tokens_per_s']:>12.0f}{1:>11.3f}",
        row("(b) outlier_hydra", r["collect_s"], "ratio_collect_over_forward"),
        row(
            "    same, full forward",
            r["collect_full_forward_s"],
            "ratio_collect_full_forward_over_forward",
            "   (no early stop: the reductions' own cost)",
        ),
        row(
            "    same, chunked",
            r["collect_chunked_s"],
            "ratio_collect_chunked_over_forward",
            f"   (analysis.chunk_layers={r['chunk_layers']})",
        ),
        row(
            "    no stage",
            r["collect_no_stage_s"],
            "ratio_collect_no_stage_over_forward",
            "   (full forward, outlier statistics only)",
        ),
    ]
    if "baseline_s" in r:
        lines.append(
            f"  {'(c) copy-to-host tool':<22}{r['baseline_s']:>10.4f}{r['tokens'] / r['baseline_s']:>12.0f}"
            f"{r['ratio_baseline_over_forward']:>11.2f}"
        )
    if r.get("peak_device_mem_forward_gb"):
        lines.append(
            f"  peak device memory: forward {r['peak_device_mem_forward_gb']:.2f} GB, "
            f"with collection {r['peak_device_mem_collect_gb']:.2f} GB"
        )
    for m in r.get("memory_scaling", []):
        lines.append(
            f"  {m['tokens']:>9} tokens streamed: {m['seconds']:.2f} s ({m['seconds_per_mtok']:.2f} s per M tokens), "
            f"peak RSS {m['peak_rss_mb']:.0f} MB"
        )
    lines.append(f"  peak host RSS {r['peak_host_rss_mb']:.0f} MB")
    return "\n".join(lines)
