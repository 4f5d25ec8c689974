"""One way to put forward hooks on a model: a context manager that always removes what it added."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable

import torch

from outlier_hydra.errors import OutlierHydraError

Hook = Callable[..., Any]  # forward hook: (module, args, output) -> None


@contextmanager
def attached(model: torch.nn.Module, hooks: Sequence[tuple[str, Hook]]) -> Iterator[None]:
    """Register (module path, forward hook) pairs in order (= firing order on a shared module) for the
    duration of the block. A path the model lacks is one line naming model.name."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for path, fn in hooks:
            if path not in modules:
                raise OutlierHydraError(
                    f"model.name: {type(model).__name__} has no module {path!r}; its adapter does not fit this model"
                )
            handles.append(modules[path].register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()
