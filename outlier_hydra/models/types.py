"""What discovery finds and the probe completes: the hook points and each layer's parts (data only).

HookPoint   one analysed input: layer_{i}_ln_attn (the token mixer's) or layer_{i}_ln_mlp (the MLP's)
MoeLayer    an MoE block's router, experts and shared experts, and where the probe found the
            router's logits and the model's own expert choices
LayerParts  one layer: its token mixer, its MLP / MoE block
Structure   the layer stack and every layer's parts; describe() is what the result files say of it
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # found by the probe: for each dense MLP, shared expert and listed expert, the matmul whose output
    # is the block's output (its down projection), or why there is none
    output_matmul: dict[str, str] = field(default_factory=dict)
    no_output_matmul: dict[str, str] = field(default_factory=dict)

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
