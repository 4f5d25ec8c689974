"""run(cfg): the whole job, as one plain function (the Hydra entry point and the tests call it).

prepare   every check that can fail on bad input (config ranges, `_target_`s, stage settings, the
          model's config.json, layers, sequence length, the corpus): no weight is loaded and
          nothing is written until they all pass
claim     the run directory (a rerun with the same config resumes, any other refuses)
gather    each batch's statistics: reused from a sweep's cache, already in stats/ (resume), or
          collected (each saved atomically); the model loads only if some batch is left
analyse   the documents per batch and merged, then the "post" stages; written atomically,
          final_analysis_results.json last: if it exists, it is complete
report    timing, provenance, plots, the logger, the summary table
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from outlier_hydra.analysis import build_documents, collector_section
from outlier_hydra.config.runtime import hydra_output_dir
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.files import NoSpace
from outlier_hydra.lock import RunLock
from outlier_hydra.output import make_plots, open_logger, print_summary
from outlier_hydra.output.report import run_report
from outlier_hydra.pipeline import cache, rundir
from outlier_hydra.pipeline.plan import LazyModel, Plan, prepare
from outlier_hydra.pipeline.provenance import environment
from outlier_hydra.stages import PostContext
from outlier_hydra.stats import DamagedStats, OutlierStats

log = logging.getLogger(__name__)


def saved_batch(plan: Plan, path: Path, index: int, stage_stats: dict) -> OutlierStats | None:
    """A finished batch's statistics from stats/, or None when there is none or it cannot be used
    (damaged, another format, another config): such a file is moved aside, never merged."""
    if not path.exists():
        return None
    try:
        stats = OutlierStats.load(path, stage_stats)
    except DamagedStats as exc:
        reason = str(exc)
    else:
        if stats.meta.get("key") == plan.stats_key and stats.meta.get("batch_index") == index:
            return stats
        reason = f"{path}: made by another config (or for another batch)"
    aside = rundir.move_aside(path)
    log.warning("%s; moved aside to %s, collecting that batch again", reason, aside.name)
    return None


def collect_batches(plan: Plan, stats_dir: Path, lazy: LazyModel) -> tuple[list[OutlierStats], dict]:
    """Each batch's statistics: from stats/ when a usable file is there (resume), else collected and
    saved. Running out of memory or disk ends the run with one line; the batches saved so far stay."""
    bs = plan.cfg.analysis.batch_size
    collecting, stage_stats = plan.stages.collecting, plan.stages.stats_classes
    num_batches = -(-len(plan.token_ids) // bs)
    batches: list[OutlierStats] = []
    done_before, seconds, new_tokens = 0, 0.0, 0
    bar = tqdm(total=plan.token_ids.size, unit="tok", desc="collecting", disable=not plan.cfg.progress)
    for b in range(num_batches):
        path = stats_dir / rundir.batch_stats_name(b)
        first = plan.first_sequence + b * bs
        stats = saved_batch(plan, path, b, stage_stats)
        if stats is not None:
            done_before += 1
        else:
            model, device = lazy.get()
            ids = torch.from_numpy(plan.token_ids[b * bs : (b + 1) * bs]).to(device)
            t0 = time.perf_counter()
            try:
                stats = plan.collector.collect_batch(model, plan.points, ids, stages=collecting, first_sequence=first)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                where = "on the GPU" if isinstance(exc, torch.OutOfMemoryError) and device.type == "cuda" else "on the host"
                del ids
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise OutlierHydraError(
                    f"out of memory {where} in batch {b + 1} of {num_batches}; {len(batches)} batches are saved in "
                    f"{stats_dir} and a rerun resumes from them: lower analysis.batch_size (now {bs}) or spread the "
                    "model over more memory (model.device_map, model.max_memory)"
                ) from None
            seconds += time.perf_counter() - t0
            new_tokens += stats.num_tokens
            stats.meta.update({"batch_index": b, "sequences": [first, first + len(ids)], "key": plan.stats_key})
            try:
                rundir.save_stats(path, stats)
            except NoSpace as exc:
                raise NoSpace(
                    f"{exc}; {len(batches)} batches are saved in {stats_dir}: free space and rerun to resume"
                ) from None
        batches.append(stats)
        bar.update(stats.num_tokens)
    bar.close()
    timing = {
        "batches": num_batches,
        "batches_already_done": done_before,
        "collect_seconds": seconds,
        "tokens_collected": new_tokens,
        "tokens_per_second": new_tokens / seconds if seconds else None,
        "collector_backend": collector_section(batches)["backend"],
    }
    return batches, timing


def gather(plan: Plan, out: Path, lazy: LazyModel) -> tuple[list[OutlierStats], dict]:
    """The batches' statistics, reusing a sweep's cache when it holds them (no model then)."""
    stats_dir = out / rundir.STATS_DIR
    root = cache.cache_dir(plan.cfg)
    reused = not stats_dir.exists() and cache.fetch(root, plan.stats_key, plan.token_ids, stats_dir)
    stats_dir.mkdir(exist_ok=True)
    batches, timing = collect_batches(plan, stats_dir, lazy)
    if reused:
        timing["reused_statistics"] = str(root / plan.stats_key) if root else None
    elif timing["batches_already_done"]:
        log.info("resumed: %d of %d batches were already done in %s", timing["batches_already_done"], timing["batches"], out)
    cache.store(root, plan.stats_key, plan.token_ids, stats_dir)
    return batches, timing


def header(plan: Plan, batches: list[OutlierStats]) -> dict:
    """What was analysed: the head of every result document."""
    return {
        "model": {
            "name": plan.cfg.model.name,
            "model_type": plan.facts.model_type,
            "dtype": plan.plain["model"]["dtype"],
            "layers": plan.layers,
            "hidden_size": batches[0].num_features,
            "structure": plan.structure.describe(plan.layers),
        },
        "dataset": {
            "num_sequences": int(plan.token_ids.shape[0]),
            "sequence_length": int(plan.token_ids.shape[1]),
            "skip_sequences": plan.first_sequence,
        },
        "collector": collector_section(batches),
    }


def analyse(plan: Plan, batches: list[OutlierStats], lazy: LazyModel, out: Path) -> tuple[dict, OutlierStats]:
    per_batch, results, total = build_documents(
        header(plan, batches),
        plan.analyzer,
        batches,
        plan.stages,
        tokenizer=plan.tokenizer,
        token_ids=plan.token_ids,
        first_sequence=plan.first_sequence,
    )
    for stage in plan.stages.post:
        ctx = PostContext(
            model=lazy.get,
            points=lambda: plan.points,
            batches=plan.batch_ids,
            results=results,
            structure=plan.structure,
            sequences=plan.sequence_ids,
        )
        results[stage.name] = stage.measure(ctx)
    rundir.write_documents(out, per_batch, results, total)
    return results, total


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict:
    """Run the configured job; returns the final results document (also written to output_dir)."""
    out = Path(output_dir) if output_dir is not None else hydra_output_dir()
    plan = prepare(cfg)
    with RunLock(out):
        results = _run_locked(cfg, plan, out)
    if cfg.progress:
        print_summary(results, plan.stages)
    log.info("%d systematic outlier features; results in %s", results["num_systematic_outliers"], out / rundir.FINAL_RESULTS)
    return results


def _run_locked(cfg: DictConfig, plan: Plan, out: Path) -> dict:
    rundir.claim(out, plan.plain, plan.token_ids)
    rundir.write_json(out / rundir.CONFIG_JSON, plan.plain)
    lazy = LazyModel(cfg, plan.facts)
    with open_logger(cfg, out, plan.plain) as logger:
        batches, timing = gather(plan, out, lazy)
        results, total = analyse(plan, batches, lazy, out)
        rundir.write_json(out / rundir.TIMING, timing)
        rundir.write_json(out / rundir.ENVIRONMENT, environment())
        plots = make_plots(out / rundir.PLOTS_DIR, results, total, plan.stages) if cfg.plots else {}
        report = run_report(out, results, plots, plan.stages)
        logger.log_results(results, total, plots, timing, plan.stages, report)
    return results
