"""One way to put hooks on a model: a context manager that always removes what it added.

A hook is (module path, function) for a forward hook ``fn(module, args, output)``, or
(module path, function, "pre") for a forward pre-hook ``fn(module, args, kwargs)``: hook points are
module *inputs* (models/discovery.py), read with :func:`on_input`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from typing import Any, Callable

import torch

from outlier_hydra.errors import OutlierHydraError

Hook = Callable[..., Any]


class Reach(IntEnum):
    """How far into a pass's last layer the forward must run for a stage (Stage.stop_after): the
    collector stops each pass at the furthest any stage asks for."""

    HOOK_POINT = 0  # the last hook point's input (the outlier statistics alone)
    ROUTER = 1  # the MoE router's output
    EXPERTS_INPUT = 2  # the routed experts' input (the choices, where the experts module is given them)
    MLP_OUTPUT = 3  # the MLP / MoE block's output: every expert of the layer ran
    LAYER_OUTPUT = 4  # the layer's output (the residual stream after it)


def on_input(path: str, at: int | str, fn: Callable[[torch.Tensor], None]) -> tuple[str, Hook, str]:
    """A pre-hook on `path` that hands fn the hidden state it receives: argument `at` (a position or a
    keyword, found by the probe forward)."""
    if isinstance(at, int):

        def hook(module, args, kwargs):
            fn(args[at])

    else:

        def hook(module, args, kwargs):
            fn(kwargs[at])

    return path, hook, "pre"


@contextmanager
def attached(model: torch.nn.Module, hooks: Sequence[tuple]) -> Iterator[None]:
    """Register hooks in order (= firing order on a shared module) for the duration of the block.
    A path the model lacks is one line naming model.name."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for path, fn, *kind in hooks:
            if path not in modules:
                raise OutlierHydraError(
                    f"model.name: {type(model).__name__} has no module {path!r}; set model.structure to where it is"
                )
            if kind and kind[0] == "pre":
                handles.append(modules[path].register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(modules[path].register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def argument(args: tuple, kwargs: dict, at: int | str | None):
    """A hook's argument by position or keyword."""
    return args[at] if isinstance(at, int) else kwargs[at]


def choices_hook(moe, receive: Callable[[torch.Tensor, torch.Tensor | None], None]) -> tuple:
    """(module path, hook[, "pre"]) for :func:`attached` that calls receive(index, weights) with the
    model's own expert choices [..., k] of the MoE layer `moe` (models.types.MoeLayer; their weights,
    None where the model gives none) at each forward, where the probe found them: the router's output,
    the experts module's arguments, or (given to no module, Llama-4) the top-k of the softmax of the
    router's logits."""
    if moe.choices == "experts":

        def pre(module, args, kwargs):
            weights = None if moe.weights_at is None else argument(args, kwargs, moe.weights_at).detach()
            receive(argument(args, kwargs, moe.index_at).detach(), weights)

        return moe.experts, pre, "pre"

    def post(module, args, output):
        if moe.choices == "router":
            weights = None if moe.weights_at is None else output[moe.weights_at].detach()
            receive(output[moe.index_at].detach(), weights)
        else:
            logits = (output if moe.logits_at is None else output[moe.logits_at]).detach().float()
            weights, index = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1).topk(moe.top_k, -1)
            receive(index, weights)

    return moe.router, post
