"""The result documents: the criteria (and each stage's report) applied to every batch alone and to
the merged statistics. Pure: statistics in, JSON-ready dicts out; writing them is the pipeline's job.

A document is the header (what was analysed: model, dataset, collector), the analyzer's section
(criteria, hooked modules, systematic features) and one section per stage, under the stage's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from outlier_hydra.stages import ReportContext, Stage, StageSet
from outlier_hydra.stats import OutlierStats, merge_all


def collector_section(batches: Sequence[OutlierStats]) -> dict:
    """Which reduction produced the statistics (one name, or the list when batches differ)."""
    used = sorted({b.meta.get("backend", "unknown") for b in batches})
    return {"backend": used[0] if len(used) == 1 else used}


def document(
    header: dict, analyzer, stats: OutlierStats, batches: Sequence[OutlierStats], stages: Sequence[Stage], context: dict
) -> dict:
    """One document: for a batch (batches = [it]) or for the merge of all batches."""
    doc = {**header, **analyzer.analyze(stats, list(batches))}
    for stage in stages:
        if stage.name in stats.extras:
            ctx = ReportContext(records=doc["systematic_outliers"], extras=stats.extras, **context)
            doc[stage.name] = stage.report(stats.extras[stage.name], ctx)
    return doc


def build_documents(
    header: dict,
    analyzer,
    batches: Sequence[OutlierStats],
    stages: Sequence[Stage],
    *,
    tokenizer: Any,
    token_ids: Any,
    first_sequence: int,
) -> tuple[list[dict], dict, OutlierStats]:
    """(per-batch documents, final document, merged statistics at the analyzer's threshold).
    token_ids (with the global index of its first row, first_sequence) and the tokenizer let stage
    reports name tokens; None for both where they are not at hand.
    "post" stages are not run here: they need the model (pipeline/job.py adds their sections)."""
    context = {"tokenizer": tokenizer, "token_ids": token_ids, "first_sequence": first_sequence}
    collect_stages = StageSet(stages).collecting
    per_batch = [document(header, analyzer, b, [b], collect_stages, context) for b in batches]
    total = dataclasses.replace(merge_all(list(batches)), threshold=analyzer.magnitude_threshold)
    return per_batch, document(header, analyzer, total, batches, collect_stages, context), total
