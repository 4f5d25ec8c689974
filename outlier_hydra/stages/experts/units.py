"""The units the experts stage reads, resolved on the real model once: a routed expert bank (one unit
of E rows), a routed expert of a list of modules, a shared expert, or a dense MLP (an expert of one).

Each unit's down projection is known by what it does, not by its widths: for a fused bank, its 3-D
down_proj parameter (the watch reads the matmuls that take it); for a module, the matmul whose output
*is* the block's output, found by the probe forward (models/probe.py: Structure.output_matmul). A unit
that has none is unobserved, with the probe's reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from outlier_hydra.models.discovery import is_conv1d
from outlier_hydra.stages.experts.stats import KINDS

NOT_PROBED = "the probe forward did not reach it"


@dataclass
class Unit:
    row0: int  # its first row in the statistics
    layer: int
    kind: int  # index in KINDS
    index: int  # routed experts of a list: which expert; shared experts: which one
    experts: int  # rows: the experts of a bank, else 1
    path: str  # the module: the experts bank's owner, or the down projection's matmul
    bank: str | None = None  # name of the down_proj bank parameter (fused experts)
    transposed: bool = False  # bank layout [E, I, H] instead of [E, H, I]
    acc: dict = field(default_factory=dict)  # the batch's accumulators on the device


@dataclass(frozen=True)
class Unobserved:
    layer: int
    kind: int  # index in KINDS
    index: int
    module: str
    reason: str


def down_bank(module: nn.Module, hidden: int) -> tuple[str, bool] | None:
    """(name, transposed) of the fused experts' down projection: the 3-D parameter named down_proj,
    else the last 3-D one; transposed when its last dim is the hidden size."""
    banks = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if not banks:
        return None
    named = [b for b in banks if "down" in b[0]]
    name, p = (named or banks)[-1]
    transposed = bool(getattr(module, "is_transposed", p.shape[-1] == hidden and p.shape[1] != hidden))
    return name, transposed


def resolve(pending: list[tuple[int, str, str]], structure, modules: dict[str, nn.Module]):
    """(units, unobserved, number of rows) of the blocks bind() chose: (layer, kind, path) each."""
    hidden = int(structure.hidden_size)
    units: list[Unit] = []
    unobserved: list[Unobserved] = []
    row = 0
    shared_index: dict[int, int] = {}

    def read(layer: int, kind: int, index: int, block: str) -> None:
        nonlocal row
        down = structure.output_matmul.get(block)
        if down is None:
            unobserved.append(Unobserved(layer, kind, index, block, structure.no_output_matmul.get(block, NOT_PROBED)))
            return
        units.append(Unit(row, layer, kind, index, 1, down))
        row += 1

    for layer, kind, path in pending:
        module = modules[path]
        if kind == "routed":
            bank = down_bank(module, hidden)
            if bank is not None:
                e = getattr(module, bank[0]).shape[0]
                units.append(Unit(row, layer, 0, 0, e, path, bank[0], bank[1]))
                row += e
            elif isinstance(module, nn.ModuleList):  # each expert's down projection
                for j in range(len(module)):
                    read(layer, 0, j, f"{path}.{j}")
            else:
                unobserved.append(
                    Unobserved(layer, 0, 0, path, "its experts are neither a 3-D weight bank nor a list of modules")
                )
        else:
            j = shared_index[layer] = shared_index.get(layer, -1) + 1 if kind == "shared" else 0
            read(layer, KINDS.index(kind), j, path)
    return units, unobserved, row


def weight_rows(module: Any, unit: Unit, dims: torch.Tensor) -> torch.Tensor:
    """[E, I]: W_e[dims_e, :] of each expert of the unit (a Linear: weight [H, I]; Conv1D: [I, H])."""
    if unit.bank is None:
        w = module.weight.t() if is_conv1d(module) else module.weight
        return w[dims.to(w.device)]
    bank = getattr(module, unit.bank)
    e = torch.arange(unit.experts, device=bank.device)
    dims = dims.to(bank.device)
    return bank[e, :, dims] if unit.transposed else bank[e, dims, :]


@torch.no_grad()
def median_abs_weight(module: Any, unit: Unit) -> np.ndarray:
    """Median |w| of the unit's down-projection matrix (per expert of a bank), on the device."""
    if unit.bank is None:
        return np.asarray([float(module.weight.detach().abs().float().median())])
    bank = getattr(module, unit.bank).detach()
    return np.asarray([float(bank[e].abs().float().median()) for e in range(unit.experts)], np.float64)
