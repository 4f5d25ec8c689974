"""What a checkpoint weighs, without loading it: its config (config.json, else the model group's
`model.architecture` numbers) and its parameters counted on the meta device, with the bytes a
quantized checkpoint stores (MXFP4 expert banks, FP8 linear weights)."""

from __future__ import annotations

from outlier_hydra.errors import OutlierHydraError


def hf_config(model_cfg):
    """(transformers config, source): config.json if readable, else the group's architecture."""
    from transformers import AutoConfig

    from outlier_hydra.models.loading import load_model_config

    try:
        return load_model_config(model_cfg), "config.json"
    except OutlierHydraError:
        if model_cfg.get("architecture") is None:
            raise
    arch = {k: v for k, v in dict(model_cfg.architecture).items() if v is not None}
    model_type = arch.pop("model_type")
    arch.update(dict(arch.pop("extra", None) or {}))
    quantization = arch.pop("quantization", None)
    if "num_experts" in arch:  # the family's own name for it
        defaults = AutoConfig.for_model(model_type)
        for name in ("num_local_experts", "n_routed_experts"):
            if hasattr(defaults, name) and not hasattr(type(defaults), "num_experts"):
                arch[name] = arch.pop("num_experts")
                break
    config = AutoConfig.for_model(model_type, **arch)
    if quantization:
        config.quantization_config = {"quant_method": quantization}
    return config, "model.architecture"


def quant_method(config) -> str | None:
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    return q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)


def stored_bytes(model, config, nbytes: int) -> tuple[float, float]:
    """(bytes as the checkpoint stores the loaded weights, bytes in model.dtype) of a meta model."""
    import torch

    method = quant_method(config)
    quantized: set[int] = set()
    if method == "mxfp4":  # the experts' weight banks; attention, router and embeddings stay as they are
        quantized = {id(p) for n, p in model.named_parameters() if ".experts." in f".{n}" and p.dim() == 3}
    elif method == "fp8":  # every linear weight and expert bank; embeddings, norms and routers stay
        q = getattr(config, "quantization_config", None)
        skip = (q.get("modules_to_not_convert") if isinstance(q, dict) else getattr(q, "modules_to_not_convert", None)) or []
        for name, module in model.named_modules():
            if any(s in name for s in skip):
                continue
            if isinstance(module, torch.nn.Linear):
                quantized.add(id(module.weight))
            quantized |= {id(p) for p in module.parameters(recurse=False) if p.dim() == 3}
    per_param = {"mxfp4": 4.25 / 8, "fp8": 1 + 4 / (128 * 128)}.get(method or "", nbytes)
    stored = plain = 0.0
    for p in model.parameters():
        plain += p.numel() * nbytes
        stored += p.numel() * (per_param if id(p) in quantized else nbytes)
    return stored, plain


def count_params(config, nbytes: int = 2) -> tuple[int, int, int, float, float]:
    """(total, active per token, loaded base model, its stored bytes, its bytes in model.dtype) from a
    model built on the meta device."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    active = total - experts + (experts * k // num_experts if experts and num_experts and k else experts)
    base = getattr(model, "base_model", model)
    loaded = sum(p.numel() for p in base.parameters())
    return total, active, loaded, *stored_bytes(base, config, nbytes)
