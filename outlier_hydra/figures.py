"""Drawing without a display, and saving a figure so that a PNG that exists is whole (every room that
draws uses these: the run's plots, each stage's, the sweep and comparison pages)."""

from __future__ import annotations

import io
from pathlib import Path

from outlier_hydra.files import atomic_write_bytes

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Render to memory, then write atomically (a full disk leaves no half-written PNG)."""
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, dpi=DPI, format="png")
    finally:
        pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
