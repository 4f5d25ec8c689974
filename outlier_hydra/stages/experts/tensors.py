"""The experts stage's tensor code: pure functions of the rows one down projection read, on the device.

rows_torch is the torch twin of the Triton kernel (collect/fused_triton.expert_rows): the same
ExpertRows from torch ops, on the CPU or a GPU without triton. The per-segment (= per expert) maxima,
counts and top rows never ask the host anything but where noted.
"""

from __future__ import annotations

import torch

from outlier_hydra.collect import fused_cpu
from outlier_hydra.collect.fused_triton import ExpertRows
from outlier_hydra.collect.reductions import at_least
from outlier_hydra.stages.experts.stats import RECORD, RECORD_IN, TOP

KEY_SEGMENT_BITS, KEY_TOKEN_BITS = 12, 20  # segment_top's one-key sort: 12 + 31 (value) + 20 bits


def segment_top(values, segment, token, n: int, k: int, tokens_below: int | None = None):
    """Per segment (expert) the k rows of largest values (row maxima, float32; < 0: a row holding
    none), equal values by the earlier token: (values [n, k] float32, -1 where fewer rows; rows
    [n, k] int64, 0 there; tokens [n, k] int64, the largest int64 there). No host sync.

    The order (segment, value descending, token) is one stable sort of an int64 key where it fits:
    n <= 2^12 segments and every known token below tokens_below < 2^20 - 1 (the batch's positions;
    an unknown token, any larger, ranks as 2^20 - 1, after all); a value >= 0 is ordered by its
    float32 bits. Elsewhere three stable sorts (token, value, segment): the same order."""
    dev, big = values.device, torch.iinfo(torch.long).max
    last_token = (1 << KEY_TOKEN_BITS) - 1
    if tokens_below is not None and n <= 1 << KEY_SEGMENT_BITS and tokens_below < last_token:
        bits = torch.where(values >= 0, values.float().view(torch.int32).long() + 1, 0)  # 0 .. 2^31 - 1
        key = (segment << (31 + KEY_TOKEN_BITS)) | (((1 << 31) - 1 - bits) << KEY_TOKEN_BITS) | token.clamp(max=last_token)
        order = key.sort(stable=True).indices
    else:
        order = token.sort(stable=True).indices
        order = order[(-values[order]).sort(stable=True).indices]
        order = order[segment[order].sort(stable=True).indices]  # by segment, then value desc, then token
    size = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, segment, torch.ones_like(segment))
    j = torch.arange(k, device=dev)
    at = (size.cumsum(0) - size)[:, None] + j  # [n, k]: each segment's first k places in the order
    held = j < size[:, None]
    rows = torch.where(held, order[at.clamp(max=max(len(order) - 1, 0))], 0)
    top = torch.where(held, values[rows], -1.0)
    held = top >= 0
    return top, torch.where(held, rows, 0), torch.where(held, token[rows], big)


def segment_counts(segment: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """counts[s, d] = #rows r with segment[r] == s, valid[r] and mask[r, d]: int64 [n, D], exact and
    without a host sync. The 0/1 products run in float16 on blocks of at most 2048 rows (float16 holds
    every integer to 2048, so each block's sums are exact whatever the matmul's accumulation), and the
    blocks are summed as int64."""
    rows, d = mask.shape
    one_hot = (torch.nn.functional.one_hot(segment, n) * valid[:, None]).to(torch.float16)  # [R, n]
    m = mask.to(torch.float16)
    block = min(BLOCK_ROWS, rows)  # rows >= 1 (_update returns before an empty call)
    whole = rows // block * block
    blocks = torch.bmm(one_hot[:whole].view(-1, block, n).transpose(1, 2), m[:whole].view(-1, block, d))
    counts = blocks.sum(0, dtype=torch.int64)
    if whole < rows:
        counts += (one_hot[whole:].t() @ m[whole:]).long()
    return counts


BLOCK_ROWS = 2048  # float16 represents the integers 0..2048 exactly


def rows_torch(x, y, expert, token, valid, e_count: int, sync_free: bool, threshold: float) -> ExpertRows:
    """fused_triton.expert_rows' numbers in torch ops (the CPU, or a GPU without triton);
    sync_free: without asking the host anything."""
    if sync_free:  # |y| once: its row maxima and the outlier mask
        y_abs = y.abs()
        y_row = torch.nan_to_num(y_abs.amax(1).float(), nan=-1.0, posinf=float("inf"))
        x_row = row_absmax(x)
    else:  # no |y| temporary on the CPU (see row_absmax)
        y_row, x_row = row_absmax(y), row_absmax(x)
    if valid is not None:
        y_row, x_row = torch.where(valid, y_row, -1.0), torch.where(valid, x_row, -1.0)
        weight_of_row = valid.long()
    else:
        weight_of_row = torch.ones_like(expert)
    if not sync_free:  # only the rows at the threshold (usually none): the host knows how many
        rows = (y_row >= threshold).nonzero()[:, 0]
        counts = torch.zeros((e_count, y.shape[1]), dtype=torch.int64, device=y.device)
        if len(rows):
            counts.index_add_(0, expert[rows], at_least(y[rows].abs(), threshold).long())
    else:  # no host sync: one-hot(expert)^T @ mask on the tensor cores, exact
        counts = segment_counts(expert, weight_of_row > 0, at_least(y_abs, threshold), e_count)
    tokens = torch.zeros(e_count, dtype=torch.long, device=y.device).index_add_(0, expert, weight_of_row)
    out_max, out_row = segment_max(y_row, expert, token, e_count)
    in_max, in_row = segment_max(x_row, expert, token, e_count)
    return ExpertRows(tokens, out_max, out_row, in_max, in_row, counts, y_row)


def row_absmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| per row without a |t| temporary (float32; NaN rows: -1). On the CPU one read of t
    (collect/fused_cpu.cpp); else amax and amin, not aminmax (4x slower over dim 1, torch 2.13), an
    Inf kept as a maximum as the C++ does (nan_to_num would make it float32's largest)."""
    if t.device.type == "cpu" and fused_cpu.available():
        return fused_cpu.row_absmax(t)
    return torch.nan_to_num(torch.maximum(t.amax(1), -t.amin(1)).float(), nan=-1.0, posinf=float("inf"))


def segment_max(values, segment, token, n):
    """Per segment: the max of values and the row holding it (equal values: the earliest token,
    then the last row; -1: no row). On the CPU one pass in C++ instead of ~14 small ops."""
    if values.device.type == "cpu" and fused_cpu.available():
        return fused_cpu.segment_max(values.float().contiguous(), segment.contiguous(), token.contiguous(), n)
    return segment_max_torch(values, segment, token, n)


def segment_max_torch(values, segment, token, n):
    """segment_max in torch ops, without a host sync."""
    dev, big = values.device, torch.iinfo(torch.long).max
    best = torch.full((n,), -1.0, device=dev).scatter_reduce_(0, segment, values, "amax")
    at = (values == best[segment]) & (values >= 0)
    first = torch.full((n,), big, dtype=torch.long, device=dev).scatter_reduce_(
        0, segment, torch.where(at, token, big), "amin"
    )
    hit = at & (token == first[segment])
    rows = torch.arange(len(values), device=dev)
    row = torch.full((n,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, segment, torch.where(hit, rows, -1), "amax")
    return best, row


def accumulate(acc: dict, new: dict) -> dict:
    """One unit's accumulators after another call's rows (new): the rule of ExpertStats.merge on the
    device (sums add, each maximum keeps its record, equal values the earlier token; the top outputs
    the largest of both). Returns the accumulators (new itself for the first call)."""
    if not acc:
        return new
    wins = (new["out_max"] > acc["out_max"]) | ((new["out_max"] == acc["out_max"]) & (new["out_token"] < acc["out_token"]))
    for k in RECORD:
        acc[k] = torch.where(wins, new[k], acc[k])
    in_wins = (new["in_max"] > acc["in_max"]) | ((new["in_max"] == acc["in_max"]) & (new["in_token"] < acc["in_token"]))
    for k in RECORD_IN:
        acc[k] = torch.where(in_wins, new[k], acc[k])
    acc["tokens"] = acc["tokens"] + new["tokens"]
    acc["counts"] = acc["counts"] + new["counts"]
    both = {k: torch.cat([acc[k], new[k]], 1) for k in TOP}  # the largest of both, as merge() keeps them
    order = both["top_token"].sort(dim=1, stable=True).indices
    order = order.gather(1, (-both["top_out"].gather(1, order)).sort(dim=1, stable=True).indices)
    for k in TOP:
        acc[k] = both[k].gather(1, order[:, : new[k].shape[1]])
    return acc
