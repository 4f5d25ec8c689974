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

Fused experts (transformers 5: 3-D gate_up_proj / down_proj banks) have no per-expert module to hook:
the stage reads the matmuls that take the down_proj bank inside the experts forward (watch.py).
The package along its seams: stats.py (the mergeable statistics), units.py (what is read, resolved
on the real model), watch.py (fused experts), tensors.py (pure tensor code, the torch twin of the
Triton kernel), report.py (section, tables, summary, plot); this module is the stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from outlier_hydra.collect import fused_triton
from outlier_hydra.collect.reductions import compile_errors, kernel_fallback
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.stages.experts import report
from outlier_hydra.stages.experts.host import batch_statistics
from outlier_hydra.stages.experts.stats import UNKNOWN_TOKEN, ExpertStats
from outlier_hydra.stages.experts.tensors import accumulate, rows_torch, segment_top
from outlier_hydra.stages.experts.units import Unit, Unobserved, median_abs_weight, resolve, weight_rows
from outlier_hydra.stages.experts.watch import Watch
from outlier_hydra.stages.protocol import Reach, ReportContext, Stage

log = logging.getLogger(__name__)


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
        """The forward must finish the last layer's MLP / MoE block (its experts ran)."""
        part = self.structure.part(layer)
        if part.mlp is None or not any(lay == layer for lay, _, _ in self.pending):
            return None
        return Reach.MLP_OUTPUT, part.mlp

    def __init__(self, config):
        super().__init__(config)
        self.threshold = float(config.magnitude_threshold)
        self.top_tokens = int(config.top_tokens)
        if self.top_tokens < 0:
            raise OutlierHydraError(f"analysis.stages.experts.top_tokens: must be >= 0, got {self.top_tokens}")

    def bind(self, structure, layers: list[int]) -> bool:
        super().bind(structure, layers)
        self.units: list[Unit] = []
        self.unobserved: list[Unobserved] = []
        self.resolved = False
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

    def _resolve(self, model: torch.nn.Module) -> None:
        """Units and their rows, from the real modules (once); the log names what cannot be read, once."""
        if self.resolved:
            return
        self.units, self.unobserved, self.num_rows = resolve(self.pending, self.structure, dict(model.named_modules()))
        self.resolved = True
        if self.unobserved:
            first = self.unobserved[0]
            log.warning(
                "experts: %d unit(s) cannot be read and are listed as unobserved (e.g. layer %d %s: %s)",
                len(self.unobserved),
                first.layer,
                first.module,
                first.reason,
            )

    # ---- device side ------------------------------------------------------------------------
    def start_batch(self, first_sequence: int) -> None:
        self.first_sequence = first_sequence
        self.watches: list[Watch | None] = []
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
        self._resolve(model)
        self.length = int(input_ids.shape[-1])
        self.positions = int(input_ids.numel())  # every known token of the batch is below it
        if getattr(self, "model_id", None) != id(model):
            self.module_of = dict(model.named_modules())
            self.median = {u.path: median_abs_weight(self.module_of[u.path], u) for u in self.units}
            self.model_id = id(model)

    def _enter(self, unit: Unit):
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
            watch = Watch(self._receiver(unit), getattr(module, unit.bank), index)
            watch.__enter__()
            self.watches.append(watch)

        return hook

    def _receiver(self, unit: Unit):
        def receive(x, y, expert, token, valid=None):
            self._update(unit, x, y, expert, token, valid)

        return receive

    def _leave(self, module, args, output):
        watch = self.watches.pop()
        if watch is not None:
            watch.__exit__(None, None, None)

    def end_pass(self) -> None:
        """After each forward (also one stopped early or failed): no mode stays active."""
        while self.watches:
            self._leave(None, None, None)

    def _linear_hook(self, unit: Unit):
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
                kernel_fallback("experts: Triton", exc, "torch ops")
                self.triton = False
                return self._update(unit, x, y, expert, token, valid)
        else:
            got = rows_torch(x, y, expert, token, valid, e_count, sync_free, self.threshold)
        ran, in_ran = got.out_row >= 0, got.in_row >= 0  # (the maxima are -1 where no row holds one)
        safe, in_safe = got.out_row.clamp_min(0), got.in_row.clamp_min(0)
        dim = y[safe].abs().argmax(1)
        wrow = weight_rows(self.module_of[unit.path], unit, dim)  # [E, I]: W_e[dim_e, :]
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
        unit.acc = accumulate(unit.acc, new)

    def finish_batch(self) -> ExpertStats:
        """The batch's statistics on the host (host.py: one copy per device and kind)."""
        offset = self.first_sequence * getattr(self, "length", 0)
        stats = batch_statistics(self.units, self.unobserved, self.num_rows, self.top_tokens, self.median, offset)
        for unit in self.units:
            unit.acc = {}
        return stats

    # ---- report -----------------------------------------------------------------------------
    def report(self, stats: ExpertStats, ctx: ReportContext) -> dict:
        return report.section(stats, ctx, self.config)

    def plots(self, section: dict, folder: Path) -> dict[str, Path]:
        return report.plots(section, folder)

    def rows(self, section: dict) -> dict[str, tuple[list[str], list[list]]]:
        return report.rows(section, int(self.config.top_units))

    def summary(self, section: dict) -> list[str]:
        return report.summary(section)
