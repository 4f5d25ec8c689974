"""run(cfg): the whole job, as one plain function (the Hydra entry point and the tests call it).

Order matters: every check that can fail on bad input (config ranges, `_target_` signatures, the
model's config.json, layers, sequence length, the corpus) runs before any weight is loaded, and
nothing is written to the run directory until they all pass. Each finished batch leaves its
statistics in stats/ (atomically); a run restarted in the same directory with the same config skips
those batches, and one with a different config refuses. final_analysis_results.json is written
last, atomically: if it exists, it is complete.
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

from outlier_hydra import report
from outlier_hydra.data import token_windows
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models import adapter_for, load_model, load_model_config, load_tokenizer
from outlier_hydra.models.loading import input_device
from outlier_hydra.stats import OutlierStats
from outlier_hydra.validate import check_config, check_sequence_length, resolve_layers

log = logging.getLogger(__name__)

# Config sections that determine the results; logger, deployment and display keys do not.
RESULT_KEYS = ("model", "dataset", "analysis")
RUN_STATE = "run_state.json"


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def fingerprint(cfg: DictConfig) -> dict:
    plain = plain_config(cfg)
    sections = {k: plain[k] for k in RESULT_KEYS}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "config": sections}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _claim_directory(out: Path, fp: dict, token_ids: np.ndarray) -> None:
    """First run in `out`: record what it runs. A rerun: refuse unless it is the same run."""
    state_path = out / RUN_STATE
    for stale in out.rglob(".*.tmp-*") if out.exists() else ():
        stale.unlink()  # left by a write that was killed halfway; the real file was never replaced
    if state_path.exists():
        old = report.read_json(state_path)
        if old.get("sha256") != fp["sha256"]:
            a, b = _flatten(old.get("config", {})), _flatten(fp["config"])
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
    buf = out / f".{report.TOKEN_IDS}.tmp"
    with open(buf, "wb") as f:
        np.save(f, token_ids)
    buf.replace(out / report.TOKEN_IDS)
    report.write_json(state_path, fp)


def hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("run(cfg) outside a Hydra app needs output_dir")
    return Path(HydraConfig.get().runtime.output_dir)


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

    _claim_directory(out, fingerprint(cfg), token_ids)
    report.write_json(out / report.CONFIG_JSON, plain_config(cfg))
    stats_dir = out / report.STATS_DIR
    stats_dir.mkdir(exist_ok=True)

    bs = cfg.analysis.batch_size
    num_batches = -(-len(token_ids) // bs)
    model, device = None, None
    batches: list[OutlierStats] = []
    resumed, collect_seconds = 0, 0.0
    first = cfg.dataset.skip_sequences
    bar = tqdm(total=token_ids.size, unit="tok", desc="collecting", disable=not cfg.progress)
    for b in range(num_batches):
        path = stats_dir / report.batch_stats_name(b)
        if path.exists():
            stats = OutlierStats.load(path)
            resumed += 1
        else:
            if model is None:
                log.info("loading %s (%s, device_map=%s)", cfg.model.name, model_config.model_type, cfg.model.device_map)
                model = load_model(cfg.model)
                device = input_device(model)
            ids = torch.from_numpy(token_ids[b * bs : (b + 1) * bs]).to(device)
            t0 = time.perf_counter()
            stats = collector.collect_batch(model, points, ids)
            collect_seconds += time.perf_counter() - t0
            stats.meta = {"batch_index": b, "sequences": [first + b * bs, first + b * bs + len(ids)]}
            stats.save(path)
        report.write_json(out / report.batch_results_name(b), analyzer.analyze(stats, [stats]))
        batches.append(stats)
        bar.update(stats.num_tokens)
    bar.close()
    if resumed:
        log.info("resumed: %d of %d batches were already done in %s", resumed, num_batches, out)

    total = batches[0]
    for s in batches[1:]:
        total = total.merge(s)
    results = {
        "model": {
            "name": cfg.model.name,
            "model_type": model_config.model_type,
            "dtype": getattr(cfg.model.dtype, "value", cfg.model.dtype),
            "layers": layers,
            "hidden_size": total.num_features,
        },
        "dataset": {
            "num_sequences": int(token_ids.shape[0]),
            "sequence_length": int(token_ids.shape[1]),
            "skip_sequences": first,
        },
        **analyzer.analyze(total, batches),
    }
    total.save(out / report.FINAL_STATS)
    new_tokens = (num_batches - resumed) and sum(s.num_tokens for s in batches[resumed:])
    report.write_json(
        out / "timing.json",
        {"collect_seconds": collect_seconds, "tokens_collected": new_tokens,
         "tokens_per_second": new_tokens / collect_seconds if collect_seconds else None},
    )
    report.write_json(out / report.FINAL_RESULTS, results)
    if cfg.progress:
        report.print_summary(results)
    log.info("%d systematic outlier features; results in %s", results["num_systematic_outliers"], out / report.FINAL_RESULTS)
    return results
