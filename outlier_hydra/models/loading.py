"""Load a model's config, tokenizer and weights (hub id or local directory), with one-line errors.

The config and tokenizer are light and load first, so that layer indices, sequence length and the
corpus are checked before any weight is read. The weights load as the *base* model (AutoModel):
the hooks sit inside it and the LM head would only add a vocab-sized matmul per token.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from outlier_hydra.config.schema import enum_value
from outlier_hydra.errors import OutlierHydraError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _check_name(key: str, name: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OutlierHydraError(f"{key}: {name} is a file, expected a model directory")
        wanted = ("config.json", "tokenizer_config.json") if key == "model.tokenizer" else ("config.json",)
        if not any((path / f).is_file() for f in wanted):
            raise OutlierHydraError(f"{key}: {name} has no {' or '.join(wanted)}")
    elif name.startswith(("/", "./", "../", "~")):
        raise OutlierHydraError(f"{key}: no such directory: {name}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_error(key: str, name: str, exc: Exception) -> OutlierHydraError:
    where = (
        "HF_HUB_OFFLINE=1 and it is not in the local cache"
        if _offline()
        else f"the hub did not give it ({type(exc).__name__})"
    )
    return OutlierHydraError(f"{key}: cannot load {name!r}: not a local directory, and {where}")


def load_model_config(model_cfg):
    """transformers' config of the checkpoint (no weights)."""
    from transformers import AutoConfig

    _check_name("model.name", model_cfg.name)
    try:
        return AutoConfig.from_pretrained(
            model_cfg.name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        if Path(model_cfg.name).expanduser().is_dir():
            raise OutlierHydraError(f"model.name: cannot read the config in {model_cfg.name}: {exc}") from exc
        raise _hub_error("model.name", model_cfg.name, exc) from exc


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer or model_cfg.name
    key = "model.tokenizer" if model_cfg.tokenizer else "model.name"
    _check_name(key, name)
    try:
        return AutoTokenizer.from_pretrained(
            name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        if Path(name).expanduser().is_dir():
            raise OutlierHydraError(f"{key}: cannot load a tokenizer from {name}: {exc}") from exc
        raise _hub_error(key, name, exc) from exc


def check_device_map(device_map: str) -> None:
    if device_map.startswith("cuda") and not torch.cuda.is_available():
        raise OutlierHydraError(f"model.device_map={device_map} but no CUDA device is visible")


def load_model(model_cfg) -> torch.nn.Module:
    """The base model in eval mode, placed by accelerate according to model.device_map."""
    from transformers import AutoModel

    device_map = model_cfg.device_map
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential") and not torch.cuda.is_available():
        device_map = "cpu"  # accelerate would spread over nothing; keep the run on the CPU
    kwargs = dict(
        dtype=DTYPES[enum_value(model_cfg.dtype)],
        device_map=device_map,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if model_cfg.max_memory:
        kwargs["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in model_cfg.max_memory.items()}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        model = AutoModel.from_pretrained(model_cfg.name, **kwargs)
    except OSError as exc:
        raise _hub_error("model.name", model_cfg.name, exc) from exc
    model.eval()
    return model


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device  # type: ignore[operator]
