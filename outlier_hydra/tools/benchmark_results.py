"""Collect the benchmark runs of scripts/gpu_check.sh into one file and one table.

    python -m outlier_hydra.tools.benchmark_results WORK_DIR RESULTS_DIR DEVICE

Every WORK_DIR/<preset>/benchmark.json goes into RESULTS_DIR/<card>-<date>.json (the card's name from
torch, e.g. nvidia-h200-2026-11-27.json; cpu-... in the CPU mode), with the versions it ran under.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from outlier_hydra.files import write_json


def card_slug(device: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; 'cpu (2 threads)' -> 'cpu'."""
    name = device.split("(")[0].strip().lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def table(runs: list[dict]) -> str:
    head = (
        f"{'preset':<20}{'forward s':>10}{'collect':>9}{'full fwd':>9}{'chunked':>9}{'no stage':>9}{'to host':>9}"
        f"{'tok/s':>10}{'peak GB fwd/coll':>18}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        peak = (
            f"{r['peak_device_mem_forward_gb']:.1f}/{r['peak_device_mem_collect_gb']:.1f}"
            if r.get("peak_device_mem_forward_gb")
            else f"RSS {r['peak_host_rss_mb'] / 1024:.1f}"
        )
        to_host = f"{r['ratio_baseline_over_forward']:.2f}x" if "ratio_baseline_over_forward" in r else "-"
        alone = r.get("ratio_collect_no_stage_over_forward")  # (older files lack it)
        no_stage = f"{alone:.3f}x" if alone else "-"
        lines.append(
            f"{r['preset']:<20}{r['forward_s']:>10.4f}{r['ratio_collect_over_forward']:>8.3f}x"
            f"{r['ratio_collect_full_forward_over_forward']:>8.3f}x{r['ratio_collect_chunked_over_forward']:>8.3f}x"
            f"{no_stage:>9}{to_host:>9}{r['collect_tokens_per_s']:>10.0f}{peak:>18}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    work, results_dir, device = (argv if argv is not None else sys.argv[1:])[:3]
    runs = [json.loads(p.read_text()) for p in sorted(Path(work).glob("*/benchmark.json"))]
    if not runs:
        print("benchmark_results: no benchmark.json under", work, file=sys.stderr)
        return 1
    import torch
    import transformers

    card = card_slug(runs[0]["device"])
    out = Path(results_dir) / f"{card}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        out,
        {
            "card": runs[0]["device"],
            "mode": device,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "runs": runs,
        },
    )
    print(
        f"== {runs[0]['device']}: x forward (collection as a run does it, with the whole forward, chunked, "
        f"with no stage; the copy-to-host tool)\n{table(runs)}\n-> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
