"""The one-screen summary of a run: the systematic features as a table, then a line or two per stage."""

from __future__ import annotations

from collections.abc import Sequence

from outlier_hydra.analysis.criteria import criteria_text
from outlier_hydra.stages import Stage


def print_summary(results: dict, stages: Sequence[Stage] = (), max_rows: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    feats = results["systematic_outliers"]
    c = results["criteria"]
    header = (
        f"[bold]{len(feats)} systematic outlier features[/bold] in {results['model']['name']}\n"
        f"{results['num_hooked_modules']} hooked modules, {results['num_tokens']} tokens; criteria: {criteria_text(c)}"
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
        console.print(f"... {len(feats) - max_rows} more in final_analysis_results.json")
    if results["nonfinite_values"]:
        console.print(f"[yellow]non-finite activations (excluded from the statistics): {results['nonfinite_values']}")
    for stage in stages:
        if stage.name in results:
            for line in stage.summary(results[stage.name]):
                console.print(f"{stage.name}: {line}", soft_wrap=True, markup=False)
