"""run(cfg): the whole job, as one plain function (the Hydra entry point and the tests call it).

Order matters: every check that can fail on bad input (config ranges, `_target_` signatures, the
model's config.json, layers, sequence length, the corpus) runs before any weight is loaded, and
nothing is written to the run directory until they all pass. Each finished batch leaves its
statistics in stats/ (atomically); a run restarted in the same directory with the same config skips
those batches, and one with a different config refuses. The model is loaded only if some batch is
left to collect (none is when resuming a finished run or reusing a sweep's statistics).
final_analysis_results.json is written last, atomically: if it exists, it is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from outlier_hydra import cache, report
from outlier_hydra.data import sequence_range, token_windows
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.loggers import open_logger
from outlier_hydra.models import adapter_for, load_model, load_model_config, load_tokenizer
from outlier_hydra.models.loading import input_device
from outlier_hydra.plots import make_plots, make_stage_plots
from outlier_hydra.stages import build_stages, instantiate_stage
from outlier_hydra.stats import OutlierStats
from outlier_hydra.validate import check_config, check_sequence_length, resolve_layers

log = logging.getLogger(__name__)

# Config sections that determine the results; logger, deployment and display keys do not.
RESULT_KEYS = ("model", "dataset", "analysis")
RUN_STATE = "run_state.json"


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def fingerprint(plain: dict) -> dict:
    sections = {k: plain[k] for k in RESULT_KEYS}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "config": sections}


def _claim_directory(out: Path, fp: dict, token_ids: np.ndarray) -> None:
    """First run in `out`: record what it runs. A rerun: refuse unless it is the same run."""
    state_path = out / RUN_STATE
    for stale in out.rglob(".*.tmp-*") if out.exists() else ():
        stale.unlink()  # left by a write that was killed halfway; the real file was never replaced
    if state_path.exists():
        old = report.read_json(state_path)
        if old.get("sha256") != fp["sha256"]:
            a, b = report.flatten(old.get("config", {})), report.flatten(fp["config"])
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            # the stage nodes copy analysis.* by interpolation: name the key the user set
            direct = [k for k in diff if not k.startswith(("analysis.collector.", "analysis.analyzer."))]
            diff = direct or diff
            raise OutlierHydraError(
                f"{out}: holds a run with a different config ({', '.join(diff[:5]) or 'unknown keys'} differ); "
                "use a new hydra.run.dir"
            )
        old_ids = np.load(out / report.TOKEN_IDS)
        if not np.array_equal(old_ids, token_ids):
            raise OutlierHydraError(f"{out}: holds a run over different tokens (the dataset changed); use a new hydra.run.dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    buf = out / f".{report.TOKEN_IDS}.tmp-0"
    with open(buf, "wb") as f:
        np.save(f, token_ids)
    buf.replace(out / report.TOKEN_IDS)
    report.write_json(state_path, fp)


def hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("run(cfg) outside a Hydra app needs output_dir")
    return Path(HydraConfig.get().runtime.output_dir)


class _LazyModel:
    """Loads the weights the first time a batch needs them, and never otherwise."""

    def __init__(self, cfg: DictConfig, model_type: str):
        self.cfg, self.model_type = cfg, model_type
        self.model, self.device = None, None

    def get(self):
        if self.model is None:
            log.info("loading %s (%s, device_map=%s)", self.cfg.model.name, self.model_type, self.cfg.model.device_map)
            self.model = load_model(self.cfg.model)
            self.device = input_device(self.model)
        return self.model, self.device


def collect_batches(cfg, collector, points, token_ids, stats_dir: Path, lazy: _LazyModel,
                    stages=()) -> tuple[list[OutlierStats], dict]:
    bs = cfg.analysis.batch_size
    first, _ = sequence_range(cfg.dataset)
    num_batches = -(-len(token_ids) // bs)
    batches, done_before, seconds, new_tokens = [], 0, 0.0, 0
    bar = tqdm(total=token_ids.size, unit="tok", desc="collecting", disable=not cfg.progress)
    for b in range(num_batches):
        path = stats_dir / report.batch_stats_name(b)
        if path.exists():
            stats = OutlierStats.load(path)
            done_before += 1
        else:
            model, device = lazy.get()
            ids = torch.from_numpy(token_ids[b * bs : (b + 1) * bs]).to(device)
            t0 = time.perf_counter()
            stats = collector.collect_batch(model, points, ids, stages=stages, first_sequence=first + b * bs)
            seconds += time.perf_counter() - t0
            new_tokens += stats.num_tokens
            stats.meta = {"batch_index": b, "sequences": [first + b * bs, first + b * bs + len(ids)]}
            stats.save(path)
        batches.append(stats)
        bar.update(stats.num_tokens)
    bar.close()
    timing = {
        "batches": num_batches,
        "batches_already_done": done_before,
        "collect_seconds": seconds,
        "tokens_collected": new_tokens,
        "tokens_per_second": new_tokens / seconds if seconds else None,
    }
    return batches, timing


def environment() -> dict:
    """Where the job ran (Slurm ids, visible GPUs, versions): provenance, kept out of the results."""
    import os
    import platform

    import transformers

    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES")
    return {
        "hostname": platform.node(),
        **{k.lower(): os.environ.get(k) for k in keys},
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict:
    """Run the configured job; returns the final results document (also written to output_dir)."""
    out = Path(output_dir) if output_dir is not None else hydra_output_dir()
    check_config(cfg)
    model_config = load_model_config(cfg.model)
    adapter = adapter_for(model_config.model_type)
    layers = resolve_layers(cfg, model_config)
    check_sequence_length(cfg, model_config)
    tokenizer = load_tokenizer(cfg.model)
    token_ids = token_windows(cfg.dataset, tokenizer)
    collector = instantiate(cfg.analysis.collector)
    analyzer = instantiate(cfg.analysis.analyzer)
    points = adapter.hook_points(layers)
    stages = [s for s in build_stages(cfg.analysis) if s.bind(adapter, layers, analyzer.magnitude_threshold)]
    int8 = instantiate_stage(cfg.analysis.int8) if cfg.analysis.int8.enabled else None
    plain = plain_config(cfg)

    _claim_directory(out, fingerprint(plain), token_ids)
    report.write_json(out / report.CONFIG_JSON, plain)
    stats_dir = out / report.STATS_DIR
    edges = getattr(collector, "edges", None)
    cache_root = cache.cache_dir(cfg) if edges is not None else None
    key = cache.cache_key(plain, edges, cfg.analysis.collector._target_, [s.name for s in stages]) if cache_root else ""

    with open_logger(cfg, out, plain) as logger:
        reused = not stats_dir.exists() and cache.fetch(cache_root, key, token_ids, stats_dir)
        stats_dir.mkdir(exist_ok=True)
        lazy = _LazyModel(cfg, model_config.model_type)
        batches, timing = collect_batches(cfg, collector, points, token_ids, stats_dir, lazy, stages)
        if reused:
            timing["reused_statistics"] = str(cache_root / key)
        elif timing["batches_already_done"]:
            log.info("resumed: %d of %d batches were already done in %s", timing["batches_already_done"], timing["batches"], out)
        cache.store(cache_root, key, token_ids, stats_dir)
        header = {
            "model": {
                "name": cfg.model.name,
                "model_type": model_config.model_type,
                "dtype": plain["model"]["dtype"],
                "layers": layers,
                "hidden_size": batches[0].num_features,
            },
            "dataset": {
                "num_sequences": int(token_ids.shape[0]),
                "sequence_length": int(token_ids.shape[1]),
                "skip_sequences": sequence_range(cfg.dataset)[0],
            },
        }
        first = sequence_range(cfg.dataset)[0]

        def int8_section(results: dict) -> dict:
            model, device = lazy.get()
            bs = cfg.analysis.batch_size
            ids = [torch.from_numpy(token_ids[i : i + bs]).to(device) for i in range(0, len(token_ids), bs)]
            keep = sorted(r["feature_dim"] for r in results["systematic_outliers"])
            return {int8.name: int8.measure(model, points, ids, keep)}

        results, total = report.write_results(out, header, analyzer, batches, stages, tokenizer, token_ids, first,
                                              finalize=int8_section if int8 else None)
        report.write_json(out / "timing.json", timing)
        report.write_json(out / "environment.json", environment())
        plots = {**make_plots(out, results, total, analyzer.magnitude_threshold), **make_stage_plots(out, results)} if cfg.plots else {}
        logger.log_results(results, total, plots, timing)
    if cfg.progress:
        report.print_summary(results)
    log.info("%d systematic outlier features; results in %s", results["num_systematic_outliers"], out / report.FINAL_RESULTS)
    return results
