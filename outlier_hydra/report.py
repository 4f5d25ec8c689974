"""What a run leaves behind: JSON result files (written atomically) and the one-screen summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from outlier_hydra.stats import atomic_write_bytes

FINAL_RESULTS = "final_analysis_results.json"
TOKEN_IDS = "token_ids.npy"
CONFIG_JSON = "config.json"
STATS_DIR = "stats"
FINAL_STATS = "statistics.npz"


def batch_results_name(index: int) -> str:
    return f"batch_{index + 1:03d}_results.json"


def batch_stats_name(index: int) -> str:
    return f"batch_{index + 1:03d}.npz"


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config keys as the user types them."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def print_summary(results: dict, max_rows: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    feats = results["systematic_outliers"]
    c = results["criteria"]
    header = (
        f"[bold]{len(feats)} systematic outlier features[/bold] in {results['model']['name']}\n"
        f"{results['num_hooked_modules']} hooked modules, {results['num_tokens']} tokens; criteria: "
        f"|x| >= {c['magnitude_threshold']:g} in >= {100 * c['min_layer_percentage']:g}% of modules "
        f"and >= {100 * c['min_seq_percentage']:g}% of positions"
    )
    table = Table()
    for col in ("dim", "max |x|", "layers %", "seq %", "occurrences", "batches", "examples"):
        table.add_column(col, justify="right" if col != "examples" else "left", no_wrap=True)
    for r in feats[:max_rows]:
        table.add_row(
            str(r["feature_dim"]),
            f"{r['max_magnitude']:.2f}",
            f"{100 * r['layer_percentage']:.1f}",
            f"{100 * r['seq_percentage']:.1f}",
            str(r["total_occurrences"]),
            f"{r['batches_systematic']}/{results['num_batches']}",
            ", ".join(f"{v:.1f}" for v in r["example_values"][:2]),
        )
    console = Console()
    console.print(header, soft_wrap=True)
    console.print(table)
    if len(feats) > max_rows:
        console.print(f"... {len(feats) - max_rows} more in {FINAL_RESULTS}")
    if results["nonfinite_values"]:
        console.print(f"[yellow]non-finite activations (excluded from the statistics): {results['nonfinite_values']}")


def write_results(out: Path, header: dict, analyzer, batches: list, stages=(), tokenizer=None,
                  token_ids=None, first_sequence: int = 0, finalize=None):
    """Apply the analyzer (and each stage's report) to each batch alone and to their merge; write
    every result file.

    header: what describes the run (model, dataset); the same in every file. finalize(results), if
    given, returns more sections for the final document (the int8 measurement). The final file is
    written last, so it exists only when the rest does. Returns (final results, merged statistics).
    """
    from outlier_hydra.stats import merge_all

    out = Path(out)

    def document(stats, group):
        doc = {**header, **analyzer.analyze(stats, group)}
        for stage in stages:
            if stage.name in stats.extras:
                doc[stage.name] = stage.report(stats, doc["systematic_outliers"], tokenizer, token_ids, first_sequence)
        return doc

    for b, stats in enumerate(batches):
        write_json(out / batch_results_name(b), document(stats, [stats]))
    total = merge_all(batches)
    total.threshold = analyzer.magnitude_threshold
    results = document(total, batches)
    if finalize is not None:
        results.update(finalize(results))
    total.save(out / FINAL_STATS)
    write_json(out / FINAL_RESULTS, results)
    return results, total


def load_batches(run_dir: Path) -> list:
    from outlier_hydra.stats import OutlierStats

    return [OutlierStats.load(p) for p in sorted((Path(run_dir) / STATS_DIR).glob("batch_*.npz"))]
