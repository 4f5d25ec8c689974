"""The end of a batch for the experts stage: the units' accumulators on the device become one
ExpertStats on the host, in as few copies as the devices allow."""

from __future__ import annotations

import numpy as np
import torch

from outlier_hydra.collect.transfer import to_host
from outlier_hydra.stages.experts.stats import TOP, ExpertStats
from outlier_hydra.stages.experts.units import Unit, Unobserved

INT_KEYS = ("tokens", "out_dim", "out_token", "col", "in_channel", "in_token")  # int64 on the device
FLOAT_KEYS = ("out_max", "weight", "contribution", "in_max")  # float32 on the device


def batch_statistics(
    units: list[Unit], unobserved: list[Unobserved], r: int, top_tokens: int, median: dict, offset: int
) -> ExpertStats:
    """The units' accumulators of one batch as ExpertStats: one host copy per device for all units'
    integers, one for their floats, and the outlier counts only where nonzero. offset: the global
    index of the batch's first token (batch-local token indices become global)."""
    keys = np.zeros((r, 4), np.int64)
    arrays = {
        "tokens": np.zeros(r, np.int64),
        "out_max": np.full(r, -1.0),
        "out_dim": np.zeros(r, np.int64),
        "out_token": np.full(r, np.iinfo(np.int64).max, np.int64),
        "col": np.zeros(r, np.int64),
        "weight": np.zeros(r),
        "contribution": np.zeros(r),
        "in_max": np.full(r, -1.0),
        "in_channel": np.zeros(r, np.int64),
        "in_token": np.full(r, np.iinfo(np.int64).max, np.int64),
        "median_abs_weight": np.zeros(r),
        "top_out": np.full((r, top_tokens), -1.0),
        "top_dim": np.zeros((r, top_tokens), np.int64),
        "top_token": np.full((r, top_tokens), np.iinfo(np.int64).max, np.int64),
    }
    for unit in units:
        span = slice(unit.row0, unit.row0 + unit.experts)
        # routed: the expert id (a bank's row, or the position in a list of expert modules)
        keys[span] = [(unit.layer, unit.kind, unit.index, unit.index + e) for e in range(unit.experts)]
        arrays["median_abs_weight"][span] = median[unit.path]
    by_device: dict[torch.device, list[Unit]] = {}
    for unit in units:
        if unit.acc:
            by_device.setdefault(unit.acc["tokens"].device, []).append(unit)
    count_rows, count_dims, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for group in by_device.values():
        rows = np.concatenate([np.arange(u.row0, u.row0 + u.experts) for u in group])
        top = {k: torch.cat([u.acc[k] for u in group]).t() for k in TOP}  # [T, rows] each
        int_rows = torch.stack([torch.cat([u.acc[k] for u in group]) for k in INT_KEYS])
        ints = to_host(torch.cat([int_rows, top["top_dim"], top["top_token"]]))  # one copy of the integers
        float_rows = torch.stack([torch.cat([u.acc[k].double() for u in group]) for k in FLOAT_KEYS])
        floats = to_host(torch.cat([float_rows, top["top_out"].double()]))  # one of the floats
        t, n_int, n_float = top_tokens, len(INT_KEYS), len(FLOAT_KEYS)
        host = {**dict(zip(INT_KEYS, ints)), **dict(zip(FLOAT_KEYS, floats))}
        held = floats[n_float:].T >= 0  # [rows, T]
        arrays["top_out"][rows] = floats[n_float:].T
        arrays["top_dim"][rows] = ints[n_int : n_int + t].T
        arrays["top_token"][rows] = np.where(held, ints[n_int + t :].T + offset, arrays["top_token"][rows])
        ran = host["out_max"] >= 0
        arrays["tokens"][rows] = host["tokens"]
        for k in ("out_max", "out_dim", "col", "weight", "contribution", "in_max", "in_channel"):
            arrays[k][rows] = np.where(ran, host[k], arrays[k][rows])
        for k in ("out_token", "in_token"):
            arrays[k][rows] = np.where(ran, host[k] + offset, arrays[k][rows])
        stacked = torch.cat([u.acc["counts"] for u in group])  # [rows, H]
        nonzero = stacked.nonzero()
        values = to_host(stacked[nonzero[:, 0], nonzero[:, 1]])
        nonzero_host = to_host(nonzero)
        count_rows.append(rows[nonzero_host[:, 0]])
        count_dims.append(nonzero_host[:, 1])
        counts.append(values)
    row_of, dim_of, count = np.concatenate(count_rows), np.concatenate(count_dims), np.concatenate(counts)
    order = np.lexsort((dim_of, row_of))
    return ExpertStats(
        keys=keys,
        **arrays,
        count_keys=np.stack([row_of[order], dim_of[order]], 1).astype(np.int64).reshape(-1, 2),
        counts=count[order].astype(np.int64),
        unobserved_keys=np.asarray([(u.layer, u.kind, u.index) for u in unobserved], np.int64).reshape(-1, 3),
        unobserved_module=np.asarray([u.module for u in unobserved], dtype=str),
        unobserved_reason=np.asarray([u.reason for u in unobserved], dtype=str),
    )
