"""The probe forward: one forward on a few tokens once the weights are loaded, which checks what
discovery found (discovery.py) and completes it from what the model really does.

  hook points     every one runs, in model order, with a tensor of the hidden size; where that tensor
                  is among the module's arguments (Structure.inputs)
  routing         where each router's logits are, and where the expert choices the model really makes
                  are: the router's own output (OLMoE, Mixtral, Qwen, gpt-oss), else the experts
                  module's arguments (DeepSeek, GLM, Granite, ...: after bias and grouped top-k), else
                  the top-k of the logits (the family's rule when neither is visible, e.g. Llama-4)
  output matmuls  for each dense MLP, shared expert and expert of a list of modules: the matmul whose
                  output *is* the block's output (its down projection, whatever its widths; for an
                  expert its owner calls piece by piece, the last of its matmuls to give the hidden
                  size), or why there is none (Structure.output_matmul / no_output_matmul)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from outlier_hydra.models.discovery import hint as _hint
from outlier_hydra.models.discovery import matrix_dims
from outlier_hydra.models.types import LayerParts, Structure

PROBE_TOKENS = 8


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
        outputs = _watch_block_outputs(structure, modules, handles)
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
    _output_matmuls(structure, modules, outputs)


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


def _blocks_with_outputs(structure: Structure, modules: dict[str, nn.Module]) -> list[str]:
    """The modules whose output matmul the experts stage needs: each dense MLP, each shared expert,
    and each expert of an MoE block that keeps its experts as a list of modules."""
    blocks: list[str] = []
    for part in structure.layers:
        if part.mlp is None:
            continue
        if part.moe is None:
            blocks.append(part.mlp)
            continue
        blocks += part.moe.shared
        experts = modules[part.moe.experts]
        if isinstance(experts, nn.ModuleList):
            blocks += [f"{part.moe.experts}.{j}" for j in range(len(experts))]
    return list(dict.fromkeys(blocks))


def _watch_block_outputs(structure: Structure, modules: dict[str, nn.Module], handles: list) -> dict[str, dict]:
    """Forward hooks recording, for each block, its output and the outputs of the matmuls inside it
    (first call of each), in the order they ran."""
    seen: dict[str, dict] = {}
    for block in _blocks_with_outputs(structure, modules):
        record: dict[str, Any] = {"out": None, "matmuls": []}
        seen[block] = record

        def on_block(module, args, output, record=record):
            if record["out"] is None:
                record["out"] = output[0] if isinstance(output, (tuple, list)) else output

        for name, m in modules[block].named_modules():  # (before the block's own: a Linear block is both)
            if matrix_dims(m) is not None:
                handles.append(m.register_forward_hook(_matmul_recorder(record, name)))
        handles.append(modules[block].register_forward_hook(on_block))
    return seen


def _matmul_recorder(record: dict, name: str):
    def on_matmul(module, args, output):
        if record["out"] is None and torch.is_tensor(output) and name not in [n for n, _ in record["matmuls"]]:
            record["matmuls"].append((name, output))

    return on_matmul


def _same_tensor(a: Any, b: Any) -> bool:
    """b is a (the same tensor, or a view of the same memory with the same shape: an identity module)."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return False
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype)


def _output_matmuls(structure: Structure, modules: dict[str, nn.Module], seen: dict[str, dict]) -> None:
    """Structure.output_matmul[block] = the matmul whose output is the block's output (the block's
    down projection, by what it does), else no_output_matmul[block] = why there is none. The experts
    of one list are alike: one that ran gives its relative path to those the probe did not route to."""
    h = structure.hidden_size
    for block, record in seen.items():
        out = record["out"]
        last = [name for name, y in record["matmuls"] if y.shape[-1] == h]
        if out is None and last:  # its matmuls ran, called by its owner (a list of experts), never itself
            structure.output_matmul[block] = f"{block}.{last[-1]}" if last[-1] else block
        elif out is None:
            structure.no_output_matmul[block] = "it never ran in the probe forward"
        elif not torch.is_tensor(out) or out.shape[-1] != h:
            structure.no_output_matmul[block] = (
                f"its output is not of the hidden size {h} (its down projection lies outside it)"
            )
        else:
            found = [name for name, y in record["matmuls"] if _same_tensor(out, y)]
            if found:
                structure.output_matmul[block] = f"{block}.{found[-1]}" if found[-1] else block
            else:
                structure.no_output_matmul[block] = "no matmul's output is its output (it is computed after its last matmul)"
    for part in structure.layers:  # experts of a list that the probe's tokens did not reach
        experts = part.moe.experts if part.moe is not None else None
        if experts is None or not isinstance(modules[experts], nn.ModuleList):
            continue
        members = [f"{experts}.{j}" for j in range(len(modules[experts]))]  # type: ignore[arg-type]
        known = [structure.output_matmul[m][len(m) + 1 :] for m in members if m in structure.output_matmul]
        for m in members:
            if (
                m not in structure.output_matmul
                and known
                and structure.no_output_matmul.get(m, "").startswith("it never ran")
            ):
                structure.output_matmul[m] = f"{m}.{known[0]}"
                structure.no_output_matmul.pop(m)
