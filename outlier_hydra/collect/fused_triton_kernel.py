"""The Triton kernel of fused_triton.py (imported only where triton is installed; jit applied there).

One program owns BD columns and a span of rows of x [N, D]. Per tile of BN rows it reads x once
(and, with UPDATE, the position buffer pval), and keeps in registers, per column: the largest |x|,
the count of non-finite values, and the count at or above each histogram edge. An edge's count is
taken only when some |x| of the tile reaches it (edges are sorted; most tiles reach two or three).
At the end the program adds its counts to the outputs with integer atomics and takes the maxima with
float atomics on non-negative values: exact and independent of the order programs finish in.
With ELEMENTWISE (1 or 2), the maxima, the non-finite count and the lowest edges' counts stay per
element until the end instead of being reduced per tile (fewer reductions, more registers: which is
faster is the GPU's to say, scripts/reduce_bench.py --tune). With UPDATE, a value replaces the position buffer's
where |x| > |pval| (ties keep the earlier), so |pval| is the position's largest |x| over the modules
so far, as the dense reduction's pabs.
"""

from __future__ import annotations

import triton
import triton.language as tl


# pragma: no mutate start (Triton runs these, compiled or interpreted, out of mutmut's reach, as the C++
# kernels are: test_fused_triton.py compares them with the dense reduction and numpy at their edges, and
# compiles every variant for sm_90)
def reduce_kernel(
    x_ptr,
    pval_ptr,
    edges_ptr,
    ge_ptr,
    amax_ptr,
    bad_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    rows_per_program,
    E: tl.constexpr,
    EP: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    UPDATE: tl.constexpr,
    ELEMENTWISE: tl.constexpr,
):
    cols = tl.program_id(0) * BD + tl.arange(0, BD)
    col_ok = cols < n_cols
    begin = tl.program_id(1) * rows_per_program
    end = tl.minimum(begin + rows_per_program, n_rows)
    edge_ids = tl.arange(0, EP)
    amax = tl.zeros([BD], dtype=tl.float32)
    bad = tl.zeros([BD], dtype=tl.int32)
    counts = tl.zeros([BD, EP], dtype=tl.int32)
    # ELEMENTWISE (0, 1 or 2): the maxima, the non-finite count and the counts of the lowest one or
    # two edges (those nearly every tile reaches) kept per element across the tiles, reduced over rows
    # once at the end
    amax_all = tl.zeros([BN, BD], dtype=tl.float32)
    bad_all = tl.zeros([BN, BD], dtype=tl.int32)
    lowest_all = tl.zeros([BN, BD], dtype=tl.int32)
    second_all = tl.zeros([BN, BD], dtype=tl.int32)
    lowest = tl.load(edges_ptr)
    second = tl.load(edges_ptr + (1 if ELEMENTWISE >= 2 else 0))
    for start in range(begin, end, BN):
        rows = start + tl.arange(0, BN)
        ok = (rows < end)[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
        a = tl.abs(x.to(tl.float32))
        finite = a < float("inf")  # False for NaN and Inf; masked-off entries are 0
        if ELEMENTWISE:
            bad_all += tl.where(finite, 0, 1)
            a = tl.where(finite, a, 0.0)
            amax_all = tl.maximum(amax_all, a)
            lowest_all += tl.where(a >= lowest, 1, 0)
            if ELEMENTWISE >= 2:
                second_all += tl.where(a >= second, 1, 0)
            top = tl.max(a)
        else:
            bad += tl.sum(tl.where(finite, 0, 1), axis=0)
            a = tl.where(finite, a, 0.0)
            tile_max = tl.max(a, axis=0)
            amax = tl.maximum(amax, tile_max)
            top = tl.max(tile_max, axis=0)
        for e in tl.static_range(ELEMENTWISE, E):
            edge = tl.load(edges_ptr + e)
            if top >= edge:
                reached = tl.sum(tl.where(a >= edge, 1, 0), axis=0)
                counts += tl.where(edge_ids[None, :] == e, reached[:, None], 0)
        if UPDATE:
            slots = pval_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            kept = tl.load(slots, mask=ok, other=0.0)
            tl.store(slots, x, mask=ok & (a > tl.abs(kept.to(tl.float32))))
    if ELEMENTWISE:
        amax = tl.max(amax_all, axis=0)
        bad = tl.sum(bad_all, axis=0)
        counts += tl.where(edge_ids[None, :] == 0, tl.sum(lowest_all, axis=0)[:, None], 0)
        if ELEMENTWISE >= 2:
            counts += tl.where(edge_ids[None, :] == 1, tl.sum(second_all, axis=0)[:, None], 0)
    counted = col_ok[:, None] & (edge_ids[None, :] < E) & (counts > 0)
    tl.atomic_add(ge_ptr + cols[:, None] * E + edge_ids[None, :], counts, mask=counted, sem="relaxed")
    tl.atomic_max(amax_ptr + cols, amax, mask=col_ok & (amax > 0), sem="relaxed")
    nonfinite = tl.sum(bad, axis=0)
    if nonfinite > 0:
        tl.atomic_add(bad_ptr, nonfinite, sem="relaxed")


@triton.jit
def row_key(value, token):
    """A row's rank for its expert's maximum, one int64 that atomic_max can take: the float32 bits of
    value (>= 0: their order is the values' order) above 2^32 - 1 - token (equal values: the earlier
    token wins; tokens at or past 2^32 - 1, the stage's unknown one among them, rank alike). -1 for a
    row that holds no value (value -1: a NaN row or one not counted)."""
    cap = tl.full(token.shape, 4294967295, tl.int64)
    low = cap - tl.minimum(tl.maximum(token, 0), cap)
    return tl.where(value >= 0, (value.to(tl.int32, bitcast=True).to(tl.int64) << 32) | low, -1)


def expert_rows_kernel(
    y_ptr,
    x_ptr,
    expert_ptr,
    token_ptr,
    valid_ptr,
    y_row_ptr,
    x_row_ptr,
    keys_ptr,
    tokens_ptr,
    counts_ptr,
    n_rows,
    n_experts,
    n_out,
    n_in,
    stride_y_row,
    stride_y_col,
    stride_x_row,
    stride_x_col,
    threshold,
    HAS_VALID: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """The experts stage's reads of one down projection's rows (stages/experts.py). Per row the
    largest |y| and |x| (float32; a row holding a NaN or not counted: -1; Inf is a maximum); per
    expert the rows counted, and the largest row_key of |y| and of |x| (keys [2, n_experts]); per
    (expert, output dim) the count of |y| >= threshold over the counted rows. All added with atomics:
    one per tile where a tile's counted rows all belong to one expert, as the sorted rows of grouped_mm
    do, else one per row (per element for the counts)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < n_rows
    expert = tl.load(expert_ptr + rows, mask=row_ok, other=0)
    token = tl.load(token_ptr + rows, mask=row_ok, other=0)
    counted = row_ok
    if HAS_VALID:
        counted = counted & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    lowest_expert = tl.min(tl.where(counted, expert, 2**62))
    one_expert = lowest_expert == tl.max(tl.where(counted, expert, -1))
    y_max = tl.zeros([BR], dtype=tl.float32)
    y_nan = tl.zeros([BR], dtype=tl.int32)
    for start in range(0, n_out, BC):
        cols = start + tl.arange(0, BC)
        ok = row_ok[:, None] & (cols < n_out)[None, :]
        offsets = rows[:, None].to(tl.int64) * stride_y_row + cols[None, :].to(tl.int64) * stride_y_col
        a = tl.abs(tl.load(y_ptr + offsets, mask=ok, other=0.0).to(tl.float32))
        nan = a != a
        y_nan = tl.maximum(y_nan, tl.max(tl.where(nan, 1, 0), axis=1))
        y_max = tl.maximum(y_max, tl.max(tl.where(nan, 0.0, a), axis=1))
        hits = ok & counted[:, None] & (a >= threshold)
        if tl.max(tl.where(hits, 1, 0)) > 0:
            if one_expert:  # (names differ per branch: Triton types a name once per if/else)
                per_dim = tl.sum(tl.where(hits, 1, 0), axis=0)
                tl.atomic_add(counts_ptr + lowest_expert * n_out + cols, per_dim, mask=per_dim > 0, sem="relaxed")
            else:
                each = counts_ptr + expert[:, None] * n_out + cols[None, :]
                tl.atomic_add(each, tl.where(hits, 1, 0), mask=hits, sem="relaxed")
    y_value = tl.where(counted & (y_nan == 0), y_max, -1.0)
    tl.store(y_row_ptr + rows, y_value, mask=row_ok)
    x_max = tl.zeros([BR], dtype=tl.float32)
    x_nan = tl.zeros([BR], dtype=tl.int32)
    for start in range(0, n_in, BC):
        cols = start + tl.arange(0, BC)
        ok = row_ok[:, None] & (cols < n_in)[None, :]
        offsets = rows[:, None].to(tl.int64) * stride_x_row + cols[None, :].to(tl.int64) * stride_x_col
        a = tl.abs(tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32))
        nan = a != a
        x_nan = tl.maximum(x_nan, tl.max(tl.where(nan, 1, 0), axis=1))
        x_max = tl.maximum(x_max, tl.max(tl.where(nan, 0.0, a), axis=1))
    x_value = tl.where(counted & (x_nan == 0), x_max, -1.0)
    tl.store(x_row_ptr + rows, x_value, mask=row_ok)
    y_key = row_key(y_value, token)
    x_key = row_key(x_value, token)
    if one_expert:
        tl.atomic_add(tokens_ptr + lowest_expert, tl.sum(tl.where(counted, 1, 0)), sem="relaxed")
        y_top = tl.max(y_key)
        x_top = tl.max(x_key)
        tl.atomic_max(keys_ptr + lowest_expert, y_top, mask=y_top >= 0, sem="relaxed")
        tl.atomic_max(keys_ptr + n_experts + lowest_expert, x_top, mask=x_top >= 0, sem="relaxed")
    else:
        tl.atomic_add(tokens_ptr + expert, tl.where(counted, 1, 0), mask=counted, sem="relaxed")
        tl.atomic_max(keys_ptr + expert, y_key, mask=y_key >= 0, sem="relaxed")
        tl.atomic_max(keys_ptr + n_experts + expert, x_key, mask=x_key >= 0, sem="relaxed")


def expert_at_kernel(expert_ptr, token_ptr, y_row_ptr, x_row_ptr, keys_ptr, at_ptr, n_rows, n_experts, BR: tl.constexpr):
    """After expert_rows_kernel: per expert, the row whose key is its largest (at [2, n_experts]; equal
    keys: the last row; -1: none). Only those rows write."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < n_rows
    expert = tl.load(expert_ptr + rows, mask=row_ok, other=0)
    token = tl.load(token_ptr + rows, mask=row_ok, other=0)
    y_key = row_key(tl.load(y_row_ptr + rows, mask=row_ok, other=-1.0), token)
    x_key = row_key(tl.load(x_row_ptr + rows, mask=row_ok, other=-1.0), token)
    y_hit = row_ok & (y_key >= 0) & (y_key == tl.load(keys_ptr + expert, mask=row_ok, other=-1))
    x_hit = row_ok & (x_key >= 0) & (x_key == tl.load(keys_ptr + n_experts + expert, mask=row_ok, other=-1))
    tl.atomic_max(at_ptr + expert, rows.to(tl.int64), mask=y_hit, sem="relaxed")
    tl.atomic_max(at_ptr + n_experts + expert, rows.to(tl.int64), mask=x_hit, sem="relaxed")
    # pragma: no mutate end
