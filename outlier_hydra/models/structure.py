"""Where to hook, found from the model's structure and checked by one probe forward.

Hook points are *inputs* of modules (forward pre-hooks), defined by what the matmuls read:
  layer_{i}_ln_attn   the hidden state entering layer i's token mixer: attention, or a linear-attention
                      / SSM / conv mixer in a hybrid layer
  layer_{i}_ln_mlp    the hidden state entering its MLP / MoE block (a layer without one has none)
For pre-norm decoders this is the output of input_layernorm / post_attention_layernorm; it is also
right where names mislead (OLMo-2 and Gemma norm the attention *output*; GPT-J, Pythia, Phi, Falcon
and Cohere feed one tensor to both blocks; BERT, OPT, GPT-2 and BLOOM name things their own way).

Discovery, from the module tree built on the meta device (no weights, so it fails before any load):
  layer stack   the first ModuleList with num_hidden_layers entries
  blocks        a layer's children that hold matmul weights and whose first matmul reads the hidden
                size. The MLP is the last one shaped like an MLP (experts, or up/gate matmuls into one
                width and one back: position-wise), failing that the last of two or more; the token
                mixer is the first other one. So a layer may have only a mixer (Mamba) or only an
                MLP (Nemotron-H's MLP and MoE layers)
  MoE           a block holding experts (a module with 3-D expert weights, or a ModuleList of like
                modules); its router is the module there whose weight is [experts, hidden]; other
                blocks inside it that read and write the hidden size are shared experts (always on)
The probe forward (a few tokens, once per load) then checks that every hook point runs in that
order with a tensor of the hidden size, and finds where each router's logits and the expert choices
the model really makes are: the router's own output (OLMoE, Mixtral, Qwen, gpt-oss), else the experts
module's arguments (DeepSeek, GLM, Granite, ...: after bias and grouped top-k), else the top-k of the
logits (the family's rule when neither is visible, e.g. Llama-4).

Anything discovery cannot decide stops with one line naming the ``model.structure`` key that fixes
it; those keys (module paths with ``{i}`` for the layer) override discovery for any family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outlier_hydra.errors import OutlierHydraError

PROBE_TOKENS = 8


@dataclass(frozen=True)
class HookPoint:
    name: str  # layer_{i}_ln_attn / layer_{i}_ln_mlp
    layer: int
    module_path: str  # the module whose input is analysed (dotted path inside the base model)
    reads: str = ""  # what that module is: "token mixer (LlamaAttention)", "MoE block (...)", ...
    at: int | str = 0  # the argument (position or keyword) that holds the hidden state (from the probe)


@dataclass
class MoeLayer:
    block: str  # the MoE block
    router: str  # module whose weight is [experts, hidden]; its output holds the logits
    experts: str  # the routed experts
    num_experts: int
    shared: list[str] = field(default_factory=list)  # shared experts: always on, never a routed choice
    # found by the probe: where the logits and the model's own choices are
    logits_at: int | None = None  # index in the router's output tuple (None: the output itself)
    choices: str = ""  # "router" | "experts" | "topk"
    index_at: int | str | None = None  # tuple index (router) or argument position / name (experts)
    weights_at: int | str | None = None
    top_k: int = 0

    def choices_hook(self, receive) -> tuple:
        """(module path, hook[, "pre"]) for collect.hooks.attached that calls receive(index, weights)
        with the model's own expert choices [..., k] (and their weights, None where the model gives
        none) at each forward, where the probe found them: the router's output, the experts module's
        arguments, or (given to no module, Llama-4) the top-k of the softmax of the router's logits."""
        if self.choices == "experts":

            def pre(module, args, kwargs):
                weights = None if self.weights_at is None else _argument(args, kwargs, self.weights_at).detach()
                receive(_argument(args, kwargs, self.index_at).detach(), weights)

            return self.experts, pre, "pre"

        def post(module, args, output):
            if self.choices == "router":
                weights = None if self.weights_at is None else output[self.weights_at].detach()
                receive(output[self.index_at].detach(), weights)
            else:
                logits = (output if self.logits_at is None else output[self.logits_at]).detach().float()
                weights, index = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1).topk(self.top_k, -1)
                receive(index, weights)

        return self.router, post


def _argument(args: tuple, kwargs: dict, at: int | str | None):
    """A hook's argument by position or keyword."""
    return args[at] if isinstance(at, int) else kwargs[at]


@dataclass
class LayerParts:
    index: int
    path: str
    mixer: str | None  # None: a layer that is only an MLP / MoE block (Nemotron-H)
    mixer_class: str | None
    mlp: str | None  # None: a layer without one (Mamba)
    mlp_class: str | None
    moe: MoeLayer | None = None


@dataclass
class Structure:
    stack: str
    hidden_size: int
    layers: list[LayerParts]
    source: str  # "discovered" or "model.structure"
    inputs: dict[str, int | str] = field(default_factory=dict)  # module path -> argument holding the hidden state

    def part(self, i: int) -> LayerParts:
        return self.layers[i]

    def layer_path(self, i: int) -> str:
        return self.layers[i].path

    def moe(self, i: int) -> MoeLayer | None:
        return self.layers[i].moe

    def hook_points(self, layers: list[int]) -> list[HookPoint]:
        """Hook points in model (execution) order for the given layers."""
        points = []
        for i in sorted(layers):
            p = self.layers[i]
            if p.mixer is not None:
                at = self.inputs.get(p.mixer, 0)
                points.append(HookPoint(f"layer_{i}_ln_attn", i, p.mixer, f"token mixer ({p.mixer_class})", at))
            if p.mlp is not None:
                kind = "MoE block" if p.moe else "MLP"
                at = self.inputs.get(p.mlp, 0)
                points.append(HookPoint(f"layer_{i}_ln_mlp", i, p.mlp, f"{kind} ({p.mlp_class})", at))
        return points

    def describe(self, layers: list[int]) -> dict:
        """What the result files say about the hook points (JSON; discovery only, so that a resumed
        run that never loads the model writes the same)."""
        moe = [i for i in layers if self.layers[i].moe is not None]
        return {
            "source": self.source,
            "layer_stack": self.stack,
            "hook_points": [{"name": p.name, "module": p.module_path, "reads": p.reads} for p in self.hook_points(layers)],
            "layers_without_mlp": [i for i in layers if self.layers[i].mlp is None],
            "layers_without_mixer": [i for i in layers if self.layers[i].mixer is None],
            "moe_layers": moe,
            "dense_mlp_layers": [i for i in layers if self.layers[i].mlp is not None and self.layers[i].moe is None],
            "routers": {
                str(i): {
                    "router": m.router,
                    "experts": m.experts,
                    "num_experts": m.num_experts,
                    "shared_experts_always_on": m.shared,
                }
                for i in moe
                for m in [self.layers[i].moe]
                if m is not None
            },
        }


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


def _first_input_width(block: nn.Module) -> int | None:
    for m in block.modules():
        mat = matrix_dims(m)
        if mat is not None:
            return mat[0]
    return None


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


def _hint(model_name: str, key: str, why: str) -> OutlierHydraError:
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
        if any(_is_block(c) and _first_input_width(c) == hidden for c in m[0].children()):
            return name, m
    if lists:
        return lists[0]
    raise _hint(model_name, "layers", f"no list of num_hidden_layers={n} layers in {type(model).__name__}")


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
        if _is_block(child) and _first_input_width(child) in (hidden, None)
    ]
    mixer = _override_path(modules, get, "mixer", i)
    mlp = _override_path(modules, get, "mlp", i)
    mlp_like = [b for b, m in blocks if b != mixer and (_experts(m, hidden) or _is_mlp_shaped(m, hidden))]
    if mixer is None and mlp is None and len(blocks) >= 2 and len(mlp_like) == len(blocks):
        # every block holds experts or looks like an MLP (JetMoE's mixture-of-attention): which one
        # mixes tokens is not decidable from shapes
        names = ", ".join(b for b, _ in blocks)
        raise _hint(model_name, "mixer", f"layer {i}: every block ({names}) looks like an MLP or MoE block")
    if mlp is None:
        # the MLP is the last block shaped like one; failing that, the last of two or more blocks
        rest = [b for b, _ in blocks if b != mixer]
        mlp = mlp_like[-1] if mlp_like else (rest[-1] if len(rest) >= 2 or (mixer and rest) else "")
    if mixer is None:  # the first other block (several, e.g. Falcon-H1's attention and SSM, read the same input)
        mixers = [b for b, _ in blocks if b != mlp and b not in mlp_like]
        mixer = mixers[0] if mixers else ""
    if not mixer and not mlp:
        raise _hint(
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
                raise _hint(model_name, "mlp", f"layer {i}: {mlp} holds no experts although model.structure.router is set")
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


# ---- the probe forward ---------------------------------------------------------------------------


def _locate(args: tuple, kwargs: dict, hidden: int) -> int | str | None:
    def fits(x):
        return torch.is_tensor(x) and x.dim() >= 2 and x.shape[-1] == hidden and x.is_floating_point()

    if args and fits(args[0]):
        return 0
    if fits(kwargs.get("hidden_states")):
        return "hidden_states"
    for k, v in kwargs.items():
        if fits(v):
            return k
    for j, v in enumerate(args):
        if fits(v):
            return j
    return None


def _choices_in(values: list[tuple[Any, Any]], e: int) -> tuple[int | str, int | str | None, int] | None:
    """(index position, weights position, k) of top-k choices among values: an integer tensor [..., k]
    with k < experts, and a float tensor of the same shape."""
    for at, v in values:
        if torch.is_tensor(v) and not v.is_floating_point() and v.dim() >= 1 and 0 < v.shape[-1] < e:
            w = [a for a, u in values if torch.is_tensor(u) and u.is_floating_point() and u.shape == v.shape]
            return at, (w[0] if w else None), int(v.shape[-1])
    return None


def config_top_k(config) -> int | None:
    for key in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_top_k", "topk"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
            return int(v[0])
    return None


@torch.inference_mode()
def probe(structure: Structure, model: nn.Module, device, model_name: str, top_k: int | None) -> None:
    """One forward on a few tokens: every hook point runs, in order, with a tensor of the hidden size;
    fills in where each module's hidden state and each router's logits and choices are."""
    modules = dict(model.named_modules())
    h = structure.hidden_size
    seen: dict[str, tuple[Any, ...]] = {}
    routed: dict[str, Any] = {}
    expert_args: dict[str, tuple] = {}
    handles = []
    order = [0]

    def pre(path):
        def fn(module, args, kwargs):
            if path not in seen:
                at = _locate(args, kwargs, h)
                seen[path] = (order[0], at)
                order[0] += 1

        return fn

    try:
        for part in structure.layers:
            for path in (part.mixer, part.mlp):
                if path and path not in seen:
                    handles.append(modules[path].register_forward_pre_hook(pre(path), with_kwargs=True))
            if part.moe is not None:
                moe = part.moe

                def on_router(module, args, output, moe=moe):
                    routed.setdefault(moe.router, output)

                def on_experts(module, args, kwargs, moe=moe):
                    expert_args.setdefault(moe.experts, (args, kwargs))

                handles.append(modules[moe.router].register_forward_hook(on_router))
                handles.append(modules[moe.experts].register_forward_pre_hook(on_experts, with_kwargs=True))
        vocab = model.get_input_embeddings().weight.shape[0]  # type: ignore[operator]
        ids = (torch.arange(PROBE_TOKENS) * 7 + 3) % max(vocab - 1, 1)
        model(input_ids=ids[None].to(device))
    finally:
        for handle in handles:
            handle.remove()

    last = -1
    for part in structure.layers:
        for key, path in (("mixer", part.mixer), ("mlp", part.mlp)):
            if not path:
                continue
            if path not in seen:
                raise _hint(model_name, key, f"{path} never ran in a probe forward")
            step, at = seen[path]
            if at is None:
                raise _hint(model_name, key, f"{path} receives no tensor of the hidden size {h}")
            if step < last:
                raise _hint(model_name, key, f"{path} runs before the module hooked ahead of it")
            last = step
            structure.inputs[path] = at
        if part.moe is not None:
            _probe_routing(part, routed, expert_args, top_k, model_name)


def _probe_routing(part: LayerParts, routed: dict, expert_args: dict, top_k: int | None, model_name: str) -> None:
    moe = part.moe
    assert moe is not None
    if moe.router not in routed:
        raise _hint(model_name, "router", f"the router {moe.router} of layer {part.index} never ran in a probe forward")
    out = routed[moe.router]
    values: list[tuple[Any, Any]] = list(enumerate(out)) if isinstance(out, (tuple, list)) else [(None, out)]
    rows = [at for at, v in values if torch.is_tensor(v) and v.is_floating_point() and v.shape[-1] >= moe.num_experts]
    if not rows:
        raise _hint(model_name, "router", f"{moe.router} gives no scores over the {moe.num_experts} experts")
    moe.logits_at = rows[0]
    found = _choices_in(values, moe.num_experts) if isinstance(out, (tuple, list)) else None
    if found is not None:
        moe.choices, (moe.index_at, moe.weights_at, moe.top_k) = "router", found
        return
    if moe.experts in expert_args:
        args, kwargs = expert_args[moe.experts]
        found = _choices_in([*enumerate(args), *kwargs.items()], moe.num_experts)
        if found is not None:
            moe.choices, (moe.index_at, moe.weights_at, moe.top_k) = "experts", found
            return
    moe.choices, moe.top_k = "topk", int(top_k or 1)


def text_config(config):
    """The language model's config (composite configs keep it in text_config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_structure(model_cfg, config) -> Structure:
    """Discovery on the model built on the meta device from its config: no weight is read."""
    from transformers import AutoModel

    text = text_config(config)
    n, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to build is reported the same way
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OutlierHydraError(
            f"model.name: transformers cannot build {model_cfg.name} ({config.model_type}): {first}"
        ) from None
    return discover(model, n, hidden, model_cfg.get("structure"), model_cfg.name)
