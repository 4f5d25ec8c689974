"""Where to hook, found from the model's structure (the probe forward, probe.py, then checks it).

Hook points are *inputs* of modules (forward pre-hooks), defined by what the matmuls read:
  layer_{i}_ln_attn   the hidden state entering layer i's token mixer: attention, or a linear-attention
                      / SSM / conv mixer in a hybrid layer
  layer_{i}_ln_mlp    the hidden state entering its MLP / MoE block (a layer without one has none)
For pre-norm decoders this is the output of input_layernorm / post_attention_layernorm; it is also
right where names mislead (OLMo-2 and Gemma norm the attention *output*; GPT-J, Pythia, Phi, Falcon
and Cohere feed one tensor to both blocks; BERT, OPT, GPT-2 and BLOOM name things their own way).

Discovery, from the module tree built on the meta device (no weights, so it fails before any load):
  layer stack   the first ModuleList with num_hidden_layers entries
  blocks        a layer's children that hold matmul weights of which one reads the hidden size (a
                gated-DeltaNet registers its output projection first: the order of registration
                says nothing). The MLP is the last one shaped like an MLP (experts, or up/gate matmuls into one
                width and one back: position-wise), failing that the last of two or more; the token
                mixer is the first other one. So a layer may have only a mixer (Mamba) or only an
                MLP (Nemotron-H's MLP and MoE layers)
  MoE           a block holding experts (a module with 3-D expert weights, or a ModuleList of like
                modules); its router is the module there whose weight is [experts, hidden]; other
                blocks inside it that read and write the hidden size are shared experts (always on)
The probe forward (probe.py, a few tokens once the weights are loaded) then checks what discovery
found and completes it (where each module's hidden state, each router's logits and choices are).

Anything discovery cannot decide stops with one line naming the ``model.structure`` key that fixes
it; those keys (module paths with ``{i}`` for the layer) override discovery for any family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from outlier_hydra.errors import OutlierHydraError, first_line
from outlier_hydra.models.configs import text_config
from outlier_hydra.models.types import LayerParts, MoeLayer, Structure

# ---- reading the module tree ---------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transposed linear (weight [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def matrix_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module that multiplies the last dim by a matrix it owns, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)):
        return None
    w = module._parameters.get("weight")
    if w is None or w.dim() != 2:
        return None
    if is_conv1d(module):  # GPT-2's transposed linear
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])  # e.g. a router that owns its weight (OLMoE, Mixtral, ...)


def _matrices(module: nn.Module) -> list[tuple[int, int]]:
    return [mat for mat in map(matrix_dims, module.modules()) if mat is not None]


def _has_3d(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return any(p.dim() == 3 for p in module._parameters.values() if p is not None)


def _reads_hidden(block: nn.Module, hidden: int, without_matrices: bool = True) -> bool:
    """Whether one of the block's matmuls reads the hidden size (a block of only 3-D expert banks, or
    nothing 2-D: `without_matrices`)."""
    mats = _matrices(block)
    return any(m[0] == hidden for m in mats) if mats else without_matrices


def _is_block(module: nn.Module) -> bool:
    return any(matrix_dims(m) is not None or _has_3d(m) for m in module.modules())


def _experts(block: nn.Module, hidden: int) -> tuple[str, int] | None:
    """(relative path, number of experts) of the routed experts inside a block: a module with a 3-D
    weight [experts, ., .] that has the hidden size in it, or a ModuleList of like MLPs."""
    for name, m in block.named_modules():
        if _has_3d(m):
            w = next(p for p in m._parameters.values() if p is not None and p.dim() == 3)
            if w.shape[0] > 1 and hidden in w.shape[1:]:
                return name, int(w.shape[0])
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1 and _is_block(m[0]):
            return name, len(m)
    return None


def _is_mlp_shaped(block: nn.Module, hidden: int) -> bool:
    """One or two matmuls read the hidden size into the same width O, one maps O (or O/2: fused
    gate+up) back to the hidden size, and nothing else: a position-wise MLP, not a token mixer."""
    mats = _matrices(block)
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in block.modules()):
        return False
    readers = [m for m in mats if m[0] == hidden]
    others = [m for m in mats if m[0] != hidden]
    if not 1 <= len(readers) <= 2 or len({r[1] for r in readers}) != 1 or len(others) != 1:
        return False
    width = readers[0][1]
    return others[0][1] == hidden and others[0][0] in (width, width // 2)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _moe(block: nn.Module, path: str, hidden: int) -> MoeLayer | None:
    found = _experts(block, hidden)
    if found is None:
        return None
    experts, e = found
    candidates = []
    for name, m in block.named_modules():
        if experts and (name == experts or name.startswith(experts + ".")):
            continue
        mat = matrix_dims(m)
        if mat is not None and mat[0] == hidden and e <= mat[1] != hidden:
            candidates.append((mat[1] - e, name))
    if not candidates:
        return None
    router = min(candidates, key=lambda c: c[0])[1]  # exactly [experts, hidden] first
    shared = []
    for name, child in block.named_children():
        if name in (experts.split(".")[0], router.split(".")[0]):
            continue
        mats = _matrices(child)
        if mats and mats[0][0] == hidden and mats[-1][1] == hidden:
            shared.append(_join(path, name))
    return MoeLayer(block=path, router=_join(path, router), experts=_join(path, experts), num_experts=e, shared=shared)


def hint(model_name: str, key: str, why: str) -> OutlierHydraError:
    return OutlierHydraError(
        f"model.name: {model_name}: {why}; set model.structure.{key} (module path, * = layer index) to say it"
    )


def _find_stack(
    model: nn.Module, modules: dict[str, nn.Module], n: int, hidden: int, override: str | None, model_name: str
) -> tuple[str, nn.ModuleList]:
    if override:
        stack = modules.get(override)
        if not isinstance(stack, nn.ModuleList) or len(stack) != n:
            raise OutlierHydraError(
                f"model.structure.layers: {override!r} is not a list of {n} layers in {type(model).__name__}"
            )
        return override, stack
    lists = [(name, m) for name, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == n and n > 0]
    for name, m in lists:  # a vision tower of the same depth comes first in some multimodal models
        if any(_is_block(c) and _reads_hidden(c, hidden, without_matrices=False) for c in m[0].children()):
            return name, m
    if lists:
        return lists[0]
    raise hint(model_name, "layers", f"no list of num_hidden_layers={n} layers in {type(model).__name__}")


def discover(model: nn.Module, num_layers: int, hidden: int, overrides: Any, model_name: str) -> Structure:
    """The structure of `model` (any device, meta included), overrides applied."""
    overrides = overrides or {}
    get = overrides.get if hasattr(overrides, "get") else lambda k: getattr(overrides, k, None)
    modules = dict(model.named_modules())
    stack_path, stack = _find_stack(model, modules, num_layers, hidden, get("layers"), model_name)
    layers = []
    for i, layer in enumerate(stack):
        path = _join(stack_path, str(i))
        layers.append(_layer_parts(model, modules, layer, path, i, hidden, get, model_name))
    source = "model.structure" if any(get(k) for k in ("layers", "mixer", "mlp", "router")) else "discovered"
    return Structure(stack=stack_path, hidden_size=hidden, layers=layers, source=source)


def _override_path(modules: dict, get, key: str, i: int) -> str | None:
    template = get(key)
    if template is None:
        return None
    path = str(template).replace("*", "{i}").format(i=i)  # * (command-line friendly) or {i}: the layer
    if path in ("", "none") or path not in modules:
        if key in ("mlp", "mixer") and path in ("", "none"):
            return ""
        if key == "router":  # layers without a router (dense-first MoE layers)
            return ""
        raise OutlierHydraError(f"model.structure.{key}: layer {i} has no module {path!r}")
    return path


def _layer_parts(model, modules, layer, path, i, hidden, get, model_name) -> LayerParts:
    blocks = [
        (_join(path, name), child)
        for name, child in layer.named_children()
        if _is_block(child) and _reads_hidden(child, hidden)
    ]
    mixer = _override_path(modules, get, "mixer", i)
    mlp = _override_path(modules, get, "mlp", i)
    mlp_like = [b for b, m in blocks if b != mixer and (_experts(m, hidden) or _is_mlp_shaped(m, hidden))]
    if mixer is None and mlp is None and len(blocks) >= 2 and len(mlp_like) == len(blocks):
        # every block holds experts or looks like an MLP (JetMoE's mixture-of-attention): which one
        # mixes tokens is not decidable from shapes
        names = ", ".join(b for b, _ in blocks)
        raise hint(model_name, "mixer", f"layer {i}: every block ({names}) looks like an MLP or MoE block")
    if mlp is None:
        # the MLP is the last block shaped like one; failing that, the last of two or more blocks
        rest = [b for b, _ in blocks if b != mixer]
        mlp = mlp_like[-1] if mlp_like else (rest[-1] if len(rest) >= 2 or (mixer and rest) else "")
    if mixer is None:  # the first other block (several, e.g. Falcon-H1's attention and SSM, read the same input)
        mixers = [b for b, _ in blocks if b != mlp and b not in mlp_like]
        mixer = mixers[0] if mixers else ""
    if not mixer and not mlp:
        raise hint(
            model_name, "mixer", f"layer {i} ({type(layer).__name__}) has no module that reads the hidden size {hidden}"
        )
    mlp_module = modules[mlp] if mlp else None
    moe = None
    if mlp_module is not None:
        router = _override_path(modules, get, "router", i)
        if router is None:
            moe = _moe(mlp_module, mlp, hidden)
        elif router:
            found = _experts(mlp_module, hidden)
            if found is None:
                raise hint(model_name, "mlp", f"layer {i}: {mlp} holds no experts although model.structure.router is set")
            moe = MoeLayer(block=mlp, router=router, experts=_join(mlp, found[0]), num_experts=found[1])
    return LayerParts(
        index=i,
        path=path,
        mixer=mixer or None,
        mixer_class=type(modules[mixer]).__name__ if mixer else None,
        mlp=mlp or None,
        mlp_class=type(mlp_module).__name__ if mlp_module is not None else None,
        moe=moe,
    )


def model_structure(model_cfg, config) -> Structure:
    """Discovery on the model built on the meta device from its config: no weight is read."""
    from transformers import AutoModel

    text = text_config(config)
    n, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to build is reported the same way
        raise OutlierHydraError(
            f"model.name: transformers cannot build {model_cfg.name} ({config.model_type}): {first_line(exc)}"
        ) from None
    return discover(model, n, hidden, model_cfg.get("structure"), model_cfg.name)
