"""One way to put hooks on a model: a context manager that always removes what it added.

A hook is (module path, function) for a forward hook ``fn(module, args, output)``, or
(module path, function, "pre") for a forward pre-hook ``fn(module, args, kwargs)``: hook points are
module *inputs* (models/structure.py), read with :func:`on_input`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable

import torch

from outlier_hydra.errors import OutlierHydraError

Hook = Callable[..., Any]


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
