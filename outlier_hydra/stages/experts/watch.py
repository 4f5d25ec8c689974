"""Reading fused experts (transformers 5: 3-D gate_up_proj / down_proj banks), which have no
per-expert module to hook: a TorchFunctionMode active during one experts forward reads the matmuls
that take the down_proj bank: F.linear or a matmul (gpt-oss: h @ W[e]) on one expert's slice (eager),
torch._grouped_mm with the bank and its offsets (grouped_mm, the CPU default), the gathered bank in
torch.bmm (batched_mm). The model computes exactly what it would without the watch: the mode only
reads arguments and results.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode


def _descending(args: tuple, kwargs: dict) -> bool:
    """Whether a call of torch.sort / Tensor.sort (input, dim, descending, ...) sorts descending."""
    return bool(kwargs.get("descending", args[2] if len(args) > 2 else False))


class Watch(TorchFunctionMode):
    """Reads the matmuls that take the down_proj bank inside one experts forward."""

    def __init__(self, receive: Callable[..., None], bank: torch.Tensor, index: torch.Tensor):
        """receive(x, y, expert, token[, valid]): the rows one matmul on the bank read and wrote, the
        expert of each row, its token (batch-local, flat; None: not known) and which rows count."""
        super().__init__()
        self.receive, self.bank = receive, bank
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
            self.receive(args[0], out, torch.full((n,), e, device=out.device), token)
        elif name == "sort" and args and self._is_choices(args[0]) and not _descending(args, kwargs):
            self.sorted = out  # grouped_mm_experts_forward's order of the rows (stable or not): not sorted twice
        elif name in ("_grouped_mm", "grouped_mm") and len(args) >= 2 and self._is_bank(args[1]):
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            # the order grouped_mm_experts_forward sorts into: its own sort's, or the same sort again
            expert_of_row, perm = self.sorted if self.sorted is not None else torch.sort(self.index.reshape(-1))
            n = out.shape[0]
            valid = torch.arange(n, device=out.device) < offs[-1].to(out.device)
            self.receive(args[0], out, expert_of_row[:n], perm[:n] // self.k, valid)
        elif name == "__getitem__" and self._is_bank(args[0]) and torch.is_tensor(args[1]) and args[1].dim() == 1:
            self.gathered[id(out)] = args[1]  # batched_mm: bank[expert_ids]
        elif name == "bmm" and len(args) >= 2 and (id(args[0]) in self.gathered or id(args[1]) in self.gathered):
            w_first = id(args[0]) in self.gathered
            ids = self.gathered[id(args[0] if w_first else args[1])]
            x = (args[1].squeeze(-1) if w_first else args[0].squeeze(1)).reshape(len(ids), -1)
            y = out.reshape(len(ids), -1)
            self.receive(x, y, ids, torch.arange(len(ids), device=ids.device) // self.k)
