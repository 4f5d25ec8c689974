"""Inside the experts: per (layer, expert) statistics of the down projection, super experts and
super-weight candidates.

Super experts (Su et al. 2025, arXiv 2507.23279): a few experts whose down_proj outputs are extreme
cause the massive activations and attention sinks (Qwen3-30B-A3B: layer 1 expert 68, layer 2 expert
92, layer 3 expert 82; Mixtral-8x7B: layer 1 expert 3). Rule: an expert's max |down_proj output| is
above the `super_percentile` (99.5) percentile of all experts' maxima and above `super_fraction`
(0.1) x the largest. Super weights (Yu et al. 2024, arXiv 2411.07191): one down_proj weight makes a
massive activation; where an output spike is made, its candidate is the input channel with the
largest contribution |W[row, col] x[col]| at the token of the spike.

What is collected, on the device, in the same forward passes, per unit (a routed expert, a shared
expert, or a dense MLP: an "expert" of one), from the down projection's own input x [n, I] and output
y [n, H] (before any routing weight):
  tokens          rows it processed (routed experts: top-k choices of it)
  max |y|         with its hidden dim, the global token index where it occurs, and there the input
                  channel with the largest contribution, that weight, and the contribution
  max |x|         with its channel (the expert's intermediate activation)
  outlier counts  per hidden dim, #(|y| >= magnitude_threshold): kept sparsely (nonzero only)
  top outputs     the `top_tokens` rows of largest max |y|: each value, its hidden dim and global
                  token index (which tokens make an expert's spikes: a super expert's few)
The matrix's median |w| is read once from the weights on the device. Everything merges exactly: sums
add; each maximum keeps its record from the batch that holds it (equal values: the earlier token);
the top outputs are the top_tokens largest of both sides by the same rule.

Fused experts (transformers 5: 3-D gate_up_proj / down_proj banks) have no per-expert module to hook.
The stage watches the experts module's forward with a TorchFunctionMode and reads the matmuls that
take the down_proj bank: F.linear or a matmul (gpt-oss: h @ W[e]) on one expert's slice (eager),
torch._grouped_mm with the bank and its offsets (grouped_mm, the CPU default), the gathered bank in
torch.bmm (batched_mm). The model computes exactly what it would without the stage: the mode only
reads arguments and results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING
from torch.overrides import TorchFunctionMode

from outlier_hydra.collect import fused_cpu, fused_triton
from outlier_hydra.collect.reductions import at_least, compile_errors
from outlier_hydra.collect.transfer import to_host
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models.structure import is_conv1d, matrix_dims
from outlier_hydra.stages import ArrayStats, ReportContext, Stage

KINDS = ("routed", "shared", "dense")
RECORD = ("out_max", "out_dim", "out_token", "col", "weight", "contribution")  # moves with out_max
RECORD_IN = ("in_max", "in_channel", "in_token")  # moves with in_max
INT_KEYS = ("tokens", "out_dim", "out_token", "col", "in_channel", "in_token")  # int64 on the device
FLOAT_KEYS = ("out_max", "weight", "contribution", "in_max")  # float32 on the device
TOP = ("top_out", "top_dim", "top_token")  # [experts, top_tokens] each: the largest row maxima
log = logging.getLogger(__name__)
UNKNOWN_TOKEN = 2**60  # rows whose token the experts implementation does not reveal (sorts after all)


@dataclass
class ExpertStats(ArrayStats):
    keys: np.ndarray  # [R, 4] int64: layer, kind (0 routed, 1 shared, 2 dense), unit index, expert
    tokens: np.ndarray  # [R] int64
    out_max: np.ndarray  # [R] float64 (-1: never ran)
    out_dim: np.ndarray  # [R] int64
    out_token: np.ndarray  # [R] int64 global token index (sequence * length + position)
    col: np.ndarray  # [R] int64 input channel of the largest contribution at that token
    weight: np.ndarray  # [R] float64 W[out_dim, col]
    contribution: np.ndarray  # [R] float64 W[out_dim, col] * x[col] at that token
    in_max: np.ndarray  # [R] float64
    in_channel: np.ndarray  # [R] int64
    in_token: np.ndarray  # [R] int64 global token index of max |x|
    median_abs_weight: np.ndarray  # [R] float64
    count_keys: np.ndarray  # [K, 2] int64 (row, dim), sorted
    counts: np.ndarray  # [K] int64
    top_out: np.ndarray  # [R, T] float64: the T largest row maxima |y| of the unit, largest first (-1: none)
    top_dim: np.ndarray  # [R, T] int64: the hidden dim of each
    top_token: np.ndarray  # [R, T] int64: its global token index (equal values: the earlier token first)

    def merge(self, other: ExpertStats) -> ExpertStats:
        if not np.array_equal(self.keys, other.keys):
            raise ValueError("expert statistics of different units")
        a, b = self, other
        b_wins = (b.out_max > a.out_max) | ((b.out_max == a.out_max) & (b.out_token < a.out_token) & (b.out_max >= 0))
        rec = {k: np.where(b_wins, getattr(b, k), getattr(a, k)) for k in RECORD}
        in_b = (b.in_max > a.in_max) | ((b.in_max == a.in_max) & (b.in_token < a.in_token) & (b.in_max >= 0))
        counts: dict[tuple[int, int], int] = {}
        for s in (a, b):
            for (r, d), c in zip(s.count_keys.tolist(), s.counts.tolist()):
                counts[(r, d)] = counts.get((r, d), 0) + c
        keys = sorted(counts)
        both = {k: np.concatenate([getattr(a, k), getattr(b, k)], axis=1) for k in TOP}
        order = np.lexsort((both["top_token"], -both["top_out"]), axis=1)[:, : a.top_out.shape[1]]
        return ExpertStats(
            keys=a.keys,
            tokens=a.tokens + b.tokens,
            **rec,
            **{k: np.where(in_b, getattr(b, k), getattr(a, k)) for k in RECORD_IN},
            median_abs_weight=np.where(a.median_abs_weight >= 0, a.median_abs_weight, b.median_abs_weight),
            count_keys=np.asarray(keys, np.int64).reshape(-1, 2),
            counts=np.asarray([counts[k] for k in keys], np.int64),
            **{k: np.take_along_axis(v, order, axis=1) for k, v in both.items()},
        )


@dataclass
class ExpertsConfig:
    """conf/analysis/stages/experts.yaml"""

    enabled: bool = MISSING
    magnitude_threshold: float = MISSING  # outlier counts per hidden dim of each expert's output
    super_percentile: float = MISSING  # super experts: max |out| above this percentile of all experts ...
    super_fraction: float = MISSING  # ... and above this fraction of the largest
    top_units: int = MISSING  # rows of the report's tables (largest max |out| first)
    top_tokens: int = MISSING  # per unit, the rows (tokens) of largest max |out| kept, with their dims
    dense_models: bool = MISSING  # also for models without MoE layers (their MLPs: experts of one)


@dataclass
class _Unit:
    row0: int  # its first row in the statistics
    layer: int
    kind: int  # index in KINDS
    index: int  # shared experts: which one
    experts: int
    path: str  # the module: experts bank owner, or the down projection Linear
    bank: str | None = None  # name of the down_proj bank parameter (fused experts)
    transposed: bool = False  # bank layout [E, I, H] instead of [E, H, I]
    acc: dict = field(default_factory=dict)


def _down_bank(module: torch.nn.Module, hidden: int) -> tuple[str, bool] | None:
    """(name, transposed) of the fused experts' down projection: the 3-D parameter named down_proj,
    else the last 3-D one; transposed when its last dim is the hidden size."""
    banks = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if not banks:
        return None
    named = [b for b in banks if "down" in b[0]]
    name, p = (named or banks)[-1]
    transposed = bool(getattr(module, "is_transposed", p.shape[-1] == hidden and p.shape[1] != hidden))
    return name, transposed


def _down_linear(block: torch.nn.Module, hidden: int) -> str | None:
    """The relative path of an MLP's down projection: its last matmul from another width to hidden."""
    found = None
    for name, m in block.named_modules():
        mat = matrix_dims(m)
        if mat is not None and mat[1] == hidden and mat[0] != hidden:
            found = name
    return found


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


def _descending(args: tuple, kwargs: dict) -> bool:
    """Whether a call of torch.sort / Tensor.sort (input, dim, descending, ...) sorts descending."""
    return bool(kwargs.get("descending", args[2] if len(args) > 2 else False))


class _Watch(TorchFunctionMode):
    """Reads the matmuls that take the down_proj bank inside one experts forward."""

    def __init__(self, stage: Experts, unit: _Unit, bank: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.stage, self.unit, self.bank = stage, unit, bank
        self.index, self.k = index, int(index.shape[-1])  # the choices: top_k_index [N, k]
        self.ptr = bank.untyped_storage().data_ptr()
        self.per_expert = bank[0].numel()
        self.gathered: dict[int, torch.Tensor] = {}  # id(bank[expert_ids]) -> expert_ids
        self.sorted: Any = None  # the model's own torch.sort of the flat choices (grouped_mm), once seen

    def _is_bank(self, t) -> bool:
        return torch.is_tensor(t) and t.untyped_storage().data_ptr() == self.ptr

    def _is_choices(self, t) -> bool:
        """t is the choices, flat: [N * k] over the same memory as top_k_index."""
        return (
            torch.is_tensor(t) and t.dim() == 1 and t.numel() == self.index.numel() and t.data_ptr() == self.index.data_ptr()
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._read(func, args, kwargs, out)
        return out

    def _read(self, func, args, kwargs, out) -> None:
        """The stage's part of one op: the model's own call is __torch_function__'s (a profile tells
        them apart by function: scripts/stage_breakdown.py)."""
        name = getattr(func, "__name__", "")
        if name in ("linear", "matmul") and len(args) >= 2 and self._is_bank(args[1]):
            e = args[1].storage_offset() // self.per_expert  # eager: one expert's slice (F.linear; h @ W[e] is matmul)
            rows = (self.index == e).t().nonzero()  # (slot, token) in the order transformers takes them
            n = args[0].reshape(-1, args[0].shape[-1]).shape[0]
            token = rows[:, 1] if len(rows) == n else None
            self.stage._update(self.unit, args[0], out, torch.full((n,), e, device=out.device), token)
        elif name == "sort" and args and self._is_choices(args[0]) and not _descending(args, kwargs):
            self.sorted = out  # grouped_mm_experts_forward's order of the rows (stable or not): not sorted twice
        elif name in ("_grouped_mm", "grouped_mm") and len(args) >= 2 and self._is_bank(args[1]):
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            # the order grouped_mm_experts_forward sorts into: its own sort's, or the same sort again
            expert_of_row, perm = self.sorted if self.sorted is not None else torch.sort(self.index.reshape(-1))
            n = out.shape[0]
            valid = torch.arange(n, device=out.device) < offs[-1].to(out.device)
            self.stage._update(self.unit, args[0], out, expert_of_row[:n], perm[:n] // self.k, valid)
        elif name == "__getitem__" and self._is_bank(args[0]) and torch.is_tensor(args[1]) and args[1].dim() == 1:
            self.gathered[id(out)] = args[1]  # batched_mm: bank[expert_ids]
        elif name == "bmm" and len(args) >= 2 and (id(args[0]) in self.gathered or id(args[1]) in self.gathered):
            w_first = id(args[0]) in self.gathered
            ids = self.gathered[id(args[0] if w_first else args[1])]
            x = (args[1].squeeze(-1) if w_first else args[0].squeeze(1)).reshape(len(ids), -1)
            y = out.reshape(len(ids), -1)
            self.stage._update(self.unit, x, y, ids, torch.arange(len(ids), device=ids.device) // self.k)


class Experts(Stage):
    """Per-expert statistics of every MoE layer's experts (and shared experts), and of dense MLPs."""

    name = "experts"
    Config = ExpertsConfig
    Stats = ExpertStats
    report_only = ("super_percentile", "super_fraction", "top_units")
    # the outlier counts without a host sync (one-hot matmul) or from the rows that reach the
    # threshold (asks the host how many); None: by device (sync-free off the CPU). Tests set it.
    sync_free: bool | None = None
    # sync-free, the row maxima and counts in one Triton kernel (collect/fused_triton.py); None: on CUDA
    # where triton imports. Tests set it (on the CPU it runs in Triton's interpreter).
    triton: bool | None = None

    def stop_after(self, layer: int) -> tuple | None:
        """The forward must finish the last layer's MLP / MoE block (rank 2.5: after its experts)."""
        part = self.structure.part(layer)
        if part.mlp is None or not any(lay == layer for lay, _, _ in self.pending):
            return None
        return 2.5, part.mlp

    def __init__(self, config):
        super().__init__(config)
        self.threshold = float(config.magnitude_threshold)
        self.top_tokens = int(config.top_tokens)
        if self.top_tokens < 0:
            raise OutlierHydraError(f"analysis.stages.experts.top_tokens: must be >= 0, got {self.top_tokens}")

    def bind(self, structure, layers: list[int]) -> bool:
        super().bind(structure, layers)
        self.units: list[_Unit] = []
        self.pending: list[tuple[int, str, str]] = []  # (layer, kind, path) resolved on the real model
        for i in self.layers:
            part = structure.part(i)
            if part.mlp is None:
                continue
            if part.moe is not None:
                self.pending.append((i, "routed", part.moe.experts))
                for path in part.moe.shared:
                    self.pending.append((i, "shared", path))
            else:
                self.pending.append((i, "dense", part.mlp))
        has_moe = any(kind == "routed" for _, kind, _ in self.pending)
        return bool(self.pending) and (has_moe or bool(self.config.dense_models))

    def _resolve(self, model: torch.nn.Module, hidden: int) -> None:
        """Units and their rows, from the real modules (once)."""
        if self.units:
            return
        modules = dict(model.named_modules())
        row = 0
        shared_index: dict[int, int] = {}
        for layer, kind, path in self.pending:
            module = modules[path]
            if kind == "routed":
                bank = _down_bank(module, hidden)
                if bank is not None:
                    e = getattr(module, bank[0]).shape[0]
                    unit = _Unit(row, layer, 0, 0, e, path, bank[0], bank[1])
                else:  # a ModuleList of expert MLPs: each one's down projection
                    for j, expert in enumerate(module):
                        down = _down_linear(expert, hidden)
                        if down is not None:
                            self.units.append(_Unit(row, layer, 0, j, 1, f"{path}.{j}.{down}"))
                            row += 1
                    continue
            else:
                down = _down_linear(module, hidden)
                if down is None:
                    continue
                j = shared_index[layer] = shared_index.get(layer, -1) + 1 if kind == "shared" else 0
                unit = _Unit(row, layer, KINDS.index(kind), j, 1, f"{path}.{down}" if down else path)
            self.units.append(unit)
            row += unit.experts
        self.num_rows = row

    # ---- device side ------------------------------------------------------------------------
    def start_batch(self, first_sequence: int) -> None:
        self.first_sequence = first_sequence
        self.watches: list[_Watch | None] = []
        self.batch_tokens = 0
        for unit in self.units:
            unit.acc = {}

    def hooks(self, layers: list[int]):
        out: list[tuple] = []
        for unit in self.units:
            if unit.layer not in layers:
                continue
            if unit.bank is not None:
                out.append((unit.path, self._enter(unit), "pre"))
                out.append((unit.path, self._leave))
            else:
                out.append((unit.path, self._linear_hook(unit)))
        return out

    def prepare(self, model: torch.nn.Module, input_ids: torch.Tensor) -> None:
        """Called by the collector before each pass: the real modules and the batch's token layout."""
        self._resolve(model, int(self.structure.hidden_size))
        self.length = int(input_ids.shape[-1])
        self.positions = int(input_ids.numel())  # every known token of the batch is below it
        if getattr(self, "model_id", None) != id(model):
            self.module_of = dict(model.named_modules())
            self.median = self._medians(model)
            self.model_id = id(model)

    def _enter(self, unit: _Unit):
        moe = self.structure.moe(unit.layer)

        def hook(module, args, kwargs):
            at = moe.index_at if moe is not None and moe.choices == "experts" else None
            index = None
            if at is not None:
                index = args[at] if isinstance(at, int) else kwargs[at]
            if index is None:  # the choices are not among its arguments: find them by shape
                values = [*args, *kwargs.values()]
                index = next((v for v in values if torch.is_tensor(v) and not v.is_floating_point() and v.dim() >= 2), None)
            if index is None:  # an experts module that is not given the choices (Llama-4): not observable
                self.watches.append(None)
                return
            index = index.reshape(-1, index.shape[-1])
            watch = _Watch(self, unit, getattr(module, unit.bank), index)
            watch.__enter__()
            self.watches.append(watch)

        return hook

    def _leave(self, module, args, output):
        watch = self.watches.pop()
        if watch is not None:
            watch.__exit__(None, None, None)

    def end_pass(self) -> None:
        """After each forward (also one stopped early or failed): no mode stays active."""
        while self.watches:
            self._leave(None, None, None)

    def _linear_hook(self, unit: _Unit):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            y = output.detach().reshape(-1, output.shape[-1])
            zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            # a dense or shared MLP reads every token in order; one expert of a list only its own
            token = None if unit.kind == 0 else torch.arange(x.shape[0], device=x.device)
            self._update(unit, x, y, zeros, token)

        return hook

    @torch.no_grad()
    def _update(self, unit, x, y, expert, token, valid=None) -> None:
        """Rows x [S, I] -> y [S, H] of `unit`, row s by expert[s] for token[s] (batch-local, flat).

        Two reads of the rows (|y| and |x| row maxima; on CUDA in Triton, which also takes each
        expert's maxima, their rows and the counts: fused_triton.expert_rows); everything else touches
        one row per expert, or (CPU) only the rows that reach the threshold. NaN rows count as never
        reaching anything."""
        x, y = x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])
        if x.shape[0] == 0:
            return
        dev, e_count = y.device, unit.experts
        big = torch.iinfo(torch.long).max
        if token is None:  # rows whose tokens are not known: the maximum is kept without its position
            token = torch.full((x.shape[0],), UNKNOWN_TOKEN, dtype=torch.long, device=dev)
        expert, token = expert.to(dev).long(), token.to(dev).long()
        sync_free = dev.type != "cpu" if self.sync_free is None else self.sync_free
        triton = dev.type == "cuda" and fused_triton.available("cuda") if self.triton is None else self.triton
        if sync_free and triton and x.dtype in fused_triton.DTYPES and y.dtype in fused_triton.DTYPES:
            # one read of y and of x: every per-expert number but the spike's dim and weight, in Triton
            try:
                got = fused_triton.expert_rows(y, x, expert, token, valid, self.threshold, e_count)
            except compile_errors() as exc:
                log.warning(
                    "experts: Triton could not build its kernel (%s); using torch ops from now on",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                self.triton = False
                return self._update(unit, x, y, expert, token, valid)
        else:
            got = self.rows_torch(x, y, expert, token, valid, e_count, sync_free, self.threshold)
        ran, in_ran = got.out_row >= 0, got.in_row >= 0  # (the maxima are -1 where no row holds one)
        safe, in_safe = got.out_row.clamp_min(0), got.in_row.clamp_min(0)
        dim = y[safe].abs().argmax(1)
        wrow = self._weight_rows(unit, dim)  # [E, I]: W_e[dim_e, :]
        contrib = wrow.float() * x[safe].float()
        col = contrib.abs().argmax(1)
        new = {
            "tokens": got.tokens,
            "out_max": got.out_max,
            "out_dim": dim,
            "out_token": torch.where(ran, token[safe], big),
            "col": col,
            "weight": wrow.gather(1, col[:, None])[:, 0].float(),
            "contribution": contrib.gather(1, col[:, None])[:, 0],
            "in_max": got.in_max,
            "in_channel": x[in_safe].abs().argmax(1),
            "in_token": torch.where(in_ran, token[in_safe], big),
            "counts": got.counts,
        }
        new["top_out"], top_row, new["top_token"] = segment_top(
            got.row_out_max, expert, token, e_count, self.top_tokens, getattr(self, "positions", None)
        )
        new["top_dim"] = torch.where(new["top_out"] >= 0, y[top_row].abs().argmax(-1), 0)  # [E, T]: each row's dim
        self._accumulate(unit, new)

    @staticmethod
    def rows_torch(x, y, expert, token, valid, e_count: int, sync_free: bool, threshold: float) -> fused_triton.ExpertRows:
        """fused_triton.expert_rows' numbers in torch ops (the CPU, or a GPU without triton);
        sync_free: without asking the host anything."""
        if sync_free:  # |y| once: its row maxima and the outlier mask
            y_abs = y.abs()
            y_row = torch.nan_to_num(y_abs.amax(1).float(), nan=-1.0, posinf=float("inf"))
            x_row = Experts._row_absmax(x)
        else:  # no |y| temporary on the CPU (see _row_absmax)
            y_row, x_row = Experts._row_absmax(y), Experts._row_absmax(x)
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
        out_max, out_row = Experts._segment_max(y_row, expert, token, e_count)
        in_max, in_row = Experts._segment_max(x_row, expert, token, e_count)
        return fused_triton.ExpertRows(tokens, out_max, out_row, in_max, in_row, counts, y_row)

    @staticmethod
    def _row_absmax(t: torch.Tensor) -> torch.Tensor:
        """max |t| per row without a |t| temporary (float32; NaN rows: -1). On the CPU one read of t
        (collect/fused_cpu.cpp); else amax and amin, not aminmax (4x slower over dim 1, torch 2.13), an
        Inf kept as a maximum as the C++ does (nan_to_num would make it float32's largest)."""
        if t.device.type == "cpu" and fused_cpu.available():
            return fused_cpu.row_absmax(t)
        return torch.nan_to_num(torch.maximum(t.amax(1), -t.amin(1)).float(), nan=-1.0, posinf=float("inf"))

    @staticmethod
    def _segment_max(values, segment, token, n):
        """Per segment: the max of values and the row holding it (equal values: the earliest token,
        then the last row; -1: no row). On the CPU one pass in C++ instead of ~14 small ops."""
        if values.device.type == "cpu" and fused_cpu.available():
            return fused_cpu.segment_max(values.float().contiguous(), segment.contiguous(), token.contiguous(), n)
        return Experts._segment_max_torch(values, segment, token, n)

    @staticmethod
    def _segment_max_torch(values, segment, token, n):
        """_segment_max in torch ops, without a host sync."""
        dev, big = values.device, torch.iinfo(torch.long).max
        best = torch.full((n,), -1.0, device=dev).scatter_reduce_(0, segment, values, "amax")
        at = (values == best[segment]) & (values >= 0)
        first = torch.full((n,), big, dtype=torch.long, device=dev).scatter_reduce_(
            0, segment, torch.where(at, token, big), "amin"
        )
        hit = at & (token == first[segment])
        rows = torch.arange(len(values), device=dev)
        row = torch.full((n,), -1, dtype=torch.long, device=dev).scatter_reduce_(
            0, segment, torch.where(hit, rows, -1), "amax"
        )
        return best, row

    def _weight_rows(self, unit: _Unit, dims: torch.Tensor) -> torch.Tensor:
        module = self.module_of[unit.path]
        if unit.bank is None:  # a Linear: weight [H, I] (GPT-2's Conv1D: [I, H])
            w = module.weight.t() if is_conv1d(module) else module.weight
            return w[dims.to(w.device)]
        bank = getattr(module, unit.bank)
        e = torch.arange(unit.experts, device=bank.device)
        dims = dims.to(bank.device)
        return bank[e, :, dims] if unit.transposed else bank[e, dims, :]

    @staticmethod
    def _accumulate(unit: _Unit, new: dict) -> None:
        acc = unit.acc
        if not acc:
            unit.acc = new
            return
        wins = (new["out_max"] > acc["out_max"]) | (
            (new["out_max"] == acc["out_max"]) & (new["out_token"] < acc["out_token"])
        )
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

    def _medians(self, model) -> dict[str, np.ndarray]:
        """Median |w| of each unit's down-projection matrix, on the device, once."""
        out = {}
        with torch.no_grad():
            for unit in self.units:
                module = self.module_of[unit.path]
                if unit.bank is None:
                    w = module.weight.detach()
                    out[unit.path] = np.asarray([float(w.abs().float().median())])
                else:
                    bank = getattr(module, unit.bank).detach()
                    out[unit.path] = np.asarray(
                        [float(bank[e].abs().float().median()) for e in range(unit.experts)], np.float64
                    )
        return out

    def finish_batch(self) -> ExpertStats:
        """One host copy per device for all units' integers, one for their floats, and the outlier
        counts only where nonzero."""
        r = self.num_rows
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
            "top_out": np.full((r, self.top_tokens), -1.0),
            "top_dim": np.zeros((r, self.top_tokens), np.int64),
            "top_token": np.full((r, self.top_tokens), np.iinfo(np.int64).max, np.int64),
        }
        for unit in self.units:
            span = slice(unit.row0, unit.row0 + unit.experts)
            # routed: the expert id (a bank's row, or the position in a list of expert modules)
            keys[span] = [(unit.layer, unit.kind, unit.index, unit.index + e) for e in range(unit.experts)]
            arrays["median_abs_weight"][span] = self.median[unit.path]
        by_device: dict[torch.device, list[_Unit]] = {}
        for unit in self.units:
            if unit.acc:
                by_device.setdefault(unit.acc["tokens"].device, []).append(unit)
        offset = self.first_sequence * getattr(self, "length", 0)
        count_rows, count_dims, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for units in by_device.values():
            rows = np.concatenate([np.arange(u.row0, u.row0 + u.experts) for u in units])
            top = {k: torch.cat([u.acc[k] for u in units]).t() for k in TOP}  # [T, rows] each
            int_rows = torch.stack([torch.cat([u.acc[k] for u in units]) for k in INT_KEYS])
            ints = to_host(torch.cat([int_rows, top["top_dim"], top["top_token"]]))  # one copy of the integers
            float_rows = torch.stack([torch.cat([u.acc[k].double() for u in units]) for k in FLOAT_KEYS])
            floats = to_host(torch.cat([float_rows, top["top_out"].double()]))  # one of the floats
            t, n_int, n_float = self.top_tokens, len(INT_KEYS), len(FLOAT_KEYS)
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
            stacked = torch.cat([u.acc["counts"] for u in units])  # [rows, H]
            nonzero = stacked.nonzero()
            values = to_host(stacked[nonzero[:, 0], nonzero[:, 1]])
            nonzero_host = to_host(nonzero)
            count_rows.append(rows[nonzero_host[:, 0]])
            count_dims.append(nonzero_host[:, 1])
            counts.append(values)
        for unit in self.units:
            unit.acc = {}
        row_of, dim_of, count = np.concatenate(count_rows), np.concatenate(count_dims), np.concatenate(counts)
        order = np.lexsort((dim_of, row_of))
        return ExpertStats(
            keys=keys,
            **arrays,
            count_keys=np.stack([row_of[order], dim_of[order]], 1).astype(np.int64).reshape(-1, 2),
            counts=count[order].astype(np.int64),
        )

    # ---- report -----------------------------------------------------------------------------
    def report(self, stats: ExpertStats, ctx: ReportContext) -> dict:
        cfg = self.config
        s = stats
        length = ctx.token_ids.shape[1] if ctx.token_ids is not None else None
        per_row_counts: dict[int, list[tuple[int, int]]] = {}
        for (row, dim), c in zip(s.count_keys.tolist(), s.counts.tolist()):
            per_row_counts.setdefault(row, []).append((c, dim))
        units: list[dict[str, Any]] = []
        for r in range(len(s.tokens)):
            layer, kind, index, expert = (int(v) for v in s.keys[r])
            entry: dict[str, Any] = {
                "layer": layer,
                "kind": KINDS[kind],
                "expert": expert if kind == 0 else index,
                "tokens": int(s.tokens[r]),
                "max_output": float(s.out_max[r]) if s.out_max[r] >= 0 else None,
                "max_output_dim": int(s.out_dim[r]),
                "max_input": float(s.in_max[r]) if s.in_max[r] >= 0 else None,
                "max_input_channel": int(s.in_channel[r]),
                "outlier_dims": [
                    {"dim": d, "count": c} for c, d in sorted(per_row_counts.get(r, []), key=lambda t: (-t[0], t[1]))[:5]
                ],
            }
            if s.out_max[r] >= 0:
                entry["max_output_at"] = self._where(int(s.out_token[r]), length, ctx)
                # the rows of largest max |y| whose token is known: which tokens make the spikes
                entry["top_outputs"] = [
                    {"value": float(v), "dim": int(d), **self._where(int(t), length, ctx)}
                    for v, d, t in zip(s.top_out[r], s.top_dim[r], s.top_token[r])
                    if v >= 0 and t < UNKNOWN_TOKEN
                ]
                median = float(s.median_abs_weight[r])
                entry["super_weight_candidate"] = {
                    "row": int(s.out_dim[r]),
                    "col": int(s.col[r]),
                    "weight": float(s.weight[r]),
                    "ratio_to_median_abs_weight": float(abs(s.weight[r]) / median) if median > 0 else None,
                    "contribution": float(s.contribution[r]),
                }
            units.append(entry)
        routed = [u for u in units if u["kind"] == "routed" and u["max_output"] is not None]
        maxima = np.asarray([u["max_output"] for u in routed]) if routed else np.zeros(0)
        supers = []
        if len(maxima):
            cut = float(np.percentile(maxima, cfg.super_percentile))
            largest = float(maxima.max())
            supers = [
                {
                    k: u[k]
                    for k in ("layer", "expert", "max_output", "max_output_dim", "max_output_at", "top_outputs", "tokens")
                }
                for u in routed
                if u["max_output"] > cut and u["max_output"] > cfg.super_fraction * largest
            ]
            supers.sort(key=lambda u: -u["max_output"])
            self._positions_share(supers, ctx)
        candidates = sorted(
            (
                u
                for u in units
                if u.get("super_weight_candidate") and u["super_weight_candidate"]["ratio_to_median_abs_weight"]
            ),
            key=lambda u: -abs(u["super_weight_candidate"]["contribution"]),
        )
        seen: dict[int, int] = {}
        for u in units:
            if u["kind"] == "routed":
                seen[u["layer"]] = seen.get(u["layer"], 0) + u["tokens"]
        return {
            # MoE layers whose experts module is not given the expert choices (or runs them in a way
            # this stage does not read, e.g. Llama-4, JetMoE): their routed experts are not observed
            "unobserved_layers": sorted(layer for layer, n in seen.items() if n == 0),
            "criteria": {
                "magnitude_threshold": self.threshold,
                "super_percentile": cfg.super_percentile,
                "super_fraction": cfg.super_fraction,
            },
            "super_experts": supers,
            "super_weight_candidates": [
                {"layer": u["layer"], "kind": u["kind"], "expert": u["expert"], **u["super_weight_candidate"]}
                for u in candidates[: cfg.top_units]
            ],
            "units": units,
        }

    @staticmethod
    def _where(token: int, length: int | None, ctx: ReportContext) -> dict[str, Any]:
        """A global token index as the report gives it: sequence, position, token id and token
        (as far as known: no index for an unknown token, no id for another shard's sequence)."""
        where: dict[str, Any] = {"token_index": token if token < UNKNOWN_TOKEN else None}
        if length and token < UNKNOWN_TOKEN:
            seq, pos = divmod(token, length)
            where.update(sequence=seq, position=pos)
            if ctx.token_ids is not None and 0 <= seq - ctx.first_sequence < len(ctx.token_ids):
                tok = int(ctx.token_ids[seq - ctx.first_sequence, pos])
                where["token_id"] = tok
                if ctx.tokenizer is not None:
                    where["token"] = ctx.tokenizer.convert_ids_to_tokens(tok)
        return where

    @staticmethod
    def _positions_share(supers: list[dict], ctx: ReportContext) -> None:
        """For each super expert, with the moe_routing statistics of the same document: the share of
        the systematic features' outlier positions at its layer's MLP input that were routed to it
        (choices of it / outlier positions, summed over the systematic dims)."""
        router = ctx.extras.get("moe_routing")
        if router is None:
            return
        dims = {r["feature_dim"] for r in ctx.records}
        rows = {int(layer): i for i, layer in enumerate(router.layers.tolist())}
        for s in supers:
            row = rows.get(s["layer"])
            chosen = positions = 0
            for j, (r, d) in enumerate(router.feat_keys.tolist()):
                if r == row and d in dims:
                    chosen += int(router.feat_counts[j][s["expert"]])
                    positions += int(router.feat_positions[j])
            s["systematic_outlier_positions"] = positions
            s["systematic_outlier_positions_routed_to_it"] = chosen
            s["systematic_outlier_positions_share"] = chosen / positions if positions else None

    # ---- outputs ----------------------------------------------------------------------------
    # pragma: no mutate start (drawing only: the numbers drawn are the section's, tested there)
    def plots(self, section: dict, folder: Path) -> dict[str, Path]:
        """expert_max_output.png: layer x expert heat map of max |down_proj output|, super experts marked."""
        routed = [u for u in section["units"] if u["kind"] == "routed" and u["max_output"] is not None]
        if not routed:
            return {}
        from outlier_hydra.output.plots import pyplot, save_figure

        plt = pyplot()
        layers = sorted({u["layer"] for u in routed})
        n_exp = max(u["expert"] for u in routed) + 1
        grid = np.full((len(layers), n_exp), np.nan)
        for u in routed:
            grid[layers.index(u["layer"]), u["expert"]] = u["max_output"]
        fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * n_exp), 1.5 + 0.3 * len(layers)))
        im = ax.imshow(np.log10(np.maximum(grid, 1e-6)), aspect="auto", cmap="viridis", interpolation="nearest")
        for s in section["super_experts"]:
            ax.scatter([s["expert"]], [layers.index(s["layer"])], marker="o", s=60, facecolors="none", edgecolors="red")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax, label="log10 max |down_proj output|")
        ax.set_title("Max |down_proj output| per expert (red circles: super experts)", fontsize=9)
        return {"expert_max_output": save_figure(fig, folder / "expert_max_output.png")}

    # pragma: no mutate end
    def rows(self, section: dict) -> dict[str, tuple[list[str], list[list]]]:
        supers = [
            [
                s["layer"],
                s["expert"],
                s["max_output"],
                s["max_output_dim"],
                s["max_output_at"].get("token", ""),
                " ".join(str(t.get("token", t.get("token_index"))) for t in s.get("top_outputs", [])),
            ]
            for s in section["super_experts"]
        ]
        weights = [
            [w["layer"], w["kind"], w["expert"], w["row"], w["col"], w["weight"], w["ratio_to_median_abs_weight"]]
            for w in section["super_weight_candidates"]
        ]
        top = sorted((u for u in section["units"] if u["max_output"] is not None), key=lambda u: -u["max_output"])[
            : self.config.top_units
        ]
        units = [
            [u["layer"], u["kind"], u["expert"], u["tokens"], u["max_output"], u["max_output_dim"], u["max_input"]]
            for u in top
        ]
        return {
            "super_experts": (["layer", "expert", "max_output", "dim", "token", "top_tokens"], supers),
            "super_weight_candidates": (["layer", "kind", "expert", "row", "col", "weight", "ratio_to_median"], weights),
            "largest_outputs": (["layer", "kind", "expert", "tokens", "max_output", "dim", "max_input"], units),
        }

    def summary(self, section: dict) -> list[str]:
        supers = section["super_experts"]
        lines = []
        if section.get("unobserved_layers"):
            lines.append(f"routed experts not observable in layers {section['unobserved_layers']}")
        if not supers:
            return lines + ["no super experts"]
        return lines + [f"super experts: {', '.join(self._named(s) for s in supers[:6])}"]

    @staticmethod
    def _named(s: dict) -> str:
        """'layer 1 expert 68 (744 on 'the', ',')': its max |out| and the first three distinct tokens
        of its top outputs (where the tokens are known)."""
        tokens = list(dict.fromkeys(t["token"] for t in s.get("top_outputs", []) if "token" in t))[:3]
        on = f" on {', '.join(map(repr, tokens))}" if tokens else ""
        return f"layer {s['layer']} expert {s['expert']} ({s['max_output']:.0f}{on})"
