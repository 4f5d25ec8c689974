import os
import sys
from pathlib import Path

import pytest

# Offline, always: nothing in the suite may reach the hub. Caches go to a throwaway folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
_TMP = Path(os.environ.get("TMPDIR", "/tmp")) / f"outlier_hydra_test_{os.getpid()}"
os.environ.setdefault("HF_HOME", str(_TMP / "hf"))
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):  # wandb writes there even with dir=
    os.environ.setdefault(_var, str(_TMP / _var.lower()))
os.environ.setdefault("WANDB_MODE", "offline")
# Without a GPU the Triton reduction runs in Triton's interpreter, which must be on before triton is
# imported (on a GPU box the kernel is compiled for the GPU as in a run)
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from outlier_hydra.config import config_dir, corpus_path, register  # noqa: E402

register()

REPO = Path(__file__).resolve().parents[1]
CORPUS = corpus_path("jargon_file_4.4.7_intro.txt")


def make_cfg(*overrides: str):
    """The composed config exactly as the CLI would build it (no Hydra runtime)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=["progress=false", *overrides])


def tiny_overrides(model_dir, *extra: str) -> list[str]:
    return [
        "model=local",
        f"model.name={model_dir}",
        "dataset=local",
        f"dataset.data_files={CORPUS}",
        "dataset.num_sequences=8",
        "dataset.sequence_length=32",
        "analysis.batch_size=4",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One tiny model per MoE family, with planted systematic outliers:
    dim 7 in the MLP input of layers 1 and 2 (2 of 8 modules: exactly 25%),
    dim 21 in the attention input of every layer (4 of 8 modules: 50%)."""
    from helpers import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    plants = {"ln_mlp": {7: [1, 2]}, "ln_attn": {21: [0, 1, 2, 3]}}
    return {f: build_tiny_model(f, root / f, plants) for f in ("olmoe", "qwen3_moe", "mixtral")}
