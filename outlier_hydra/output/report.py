"""report.html: one self-contained page per run, sweep and comparison.

Plots are embedded (PNG as data URIs), the style and the table sorting are inline: the page opens
from disk, offline, with no external script, font or stylesheet, at 1280 px and on a phone. Every
table is sortable by clicking its header (numbers as numbers). Stage sections come from each stage's
rows() (the same rows W&B gets as tables) and summary().
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from outlier_hydra.analysis.criteria import FEATURE_FIELDS as FEATURE_COLUMNS
from outlier_hydra.analysis.criteria import criteria_text
from outlier_hydra.files import atomic_write_bytes
from outlier_hydra.models.label import short_name

REPORT = "report.html"

STYLE = """
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1280px;margin:0 auto;padding:16px}h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .4em}
.meta{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:8px;margin:12px 0}
.meta div{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 10px;overflow-wrap:anywhere}
.meta b{display:block;font-size:.8em;color:#5b6474}
.scroll{overflow-x:auto;background:#fff;border:1px solid #dde1e7;border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{padding:6px 8px;border-bottom:1px solid #eceef2;text-align:right;vertical-align:top}
th{position:sticky;top:0;background:#eef1f5;cursor:pointer;white-space:nowrap;user-select:none}th[data-dir=asc]:after{content:" \\25B2"}
th[data-dir=desc]:after{content:" \\25BC"}td.text,th.text{text-align:left}td.text{min-width:7em;max-width:420px;overflow-wrap:break-word}
figure{margin:12px 0;background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#5b6474}.note{color:#5b6474;font-size:.9em}ul.lines{margin:.3em 0 .8em 1.2em;padding:0}
@media (max-width:600px){main{padding:8px}body{font-size:14px}th,td{padding:4px 5px}}
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function(table){
  table.querySelectorAll("th").forEach(function(th, col){
    th.addEventListener("click", function(){
      var dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("th").forEach(function(h){ delete h.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row){ var c = row.cells[col]; var v = c.dataset.sort !== undefined ? c.dataset.sort : c.textContent;
        var n = parseFloat(v); return isNaN(n) || !/^-?[0-9.eE+-]+$/.test(v.trim()) ? v.toLowerCase() : n; }
      rows.sort(function(a, b){ var x = key(a), y = key(b);
        var r = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
        return dir === "asc" ? r : -r; });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f'<td class="text">{html.escape(str(value))}</td>'
    if isinstance(value, (int, float)):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f'<td data-sort="{value!r}">{html.escape(shown)}</td>'
    if isinstance(value, (list, tuple)):
        value = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return f'<td class="text">{html.escape(str(value))}</td>'


def table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "", links: dict[int, str] | None = None
) -> str:
    """A sortable table; links: row index -> href for the row's first cell."""
    text_cols = {
        i for i, _ in enumerate(columns) if rows and all(isinstance(r[i], str) or isinstance(r[i], list) for r in rows)
    }
    head = "".join(f'<th class="{"text" if i in text_cols else ""}">{html.escape(c)}</th>' for i, c in enumerate(columns))
    body = []
    for n, row in enumerate(rows):
        cells = [_cell(v) for v in row]
        if links and n in links:
            cells[0] = f'<td class="text"><a href="{html.escape(links[n])}">{html.escape(str(row[0]))}</a></td>'
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="scroll"><table class="sortable"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def meta(items: dict[str, Any]) -> str:
    return (
        '<div class="meta">'
        + "".join(f"<div><b>{html.escape(k)}</b>{html.escape(str(v))}</div>" for k, v in items.items())
        + "</div>"
    )


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{STYLE}</style></head>'
        f"<body><main>{body}</main><script>{SORT_SCRIPT}</script></body></html>\n"
    )


def write(path: Path, title: str, body: str) -> Path:
    atomic_write_bytes(path, page(title, body).encode())
    return path


def run_report(out: Path, results: dict, plots: dict[str, Path], stages: Sequence = ()) -> Path:
    """<run dir>/report.html: what was analysed, the systematic features, the plots, the stages."""
    m, d = results["model"], results["dataset"]
    parts = [
        f"<h1>{results['num_systematic_outliers']} systematic outlier features</h1>",
        meta(
            {
                "model": m["name"],
                "model type": m["model_type"],
                "dtype": m["dtype"],
                "tokens": f"{results['num_tokens']} ({d['num_sequences']} x {d['sequence_length']})",
                "hooked modules": results["num_hooked_modules"],
                "batches": results["num_batches"],
                "criteria": criteria_text(results["criteria"], ge="≥"),
                "reduction": results.get("collector", {}).get("backend", "?"),
            }
        ),
        "<h2>Systematic features</h2>",
        table(FEATURE_COLUMNS, [[r.get(c) for c in FEATURE_COLUMNS] for r in results["systematic_outliers"]], "features"),
    ]
    if results["nonfinite_values"]:
        parts.append(
            f'<p class="note">non-finite activations (excluded): {html.escape(json.dumps(results["nonfinite_values"]))}</p>'
        )
    for name, path in plots.items():
        parts.append(figure(path, name.replace("_", " ")))
    for stage in stages:
        section = results.get(stage.name)
        if section is None:
            continue
        parts.append(f"<h2>{html.escape(stage.name)}</h2>")
        lines = stage.summary(section)
        if lines:
            parts.append('<ul class="lines">' + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
        for title, (columns, rows) in stage.rows(section).items():
            parts.append(f'<p class="note">{html.escape(title)}</p>' + table(columns, rows))
    return write(Path(out) / REPORT, f"outlier_hydra: {m['name']}", "".join(parts))


def sweep_report(sweep_dir: Path, rows: list[dict], columns: list[str], plot: Path | None) -> Path:
    """<sweep dir>/report.html: a row per job, linked to the job's own report."""
    links = {n: f"{r['job']}/{REPORT}" for n, r in enumerate(rows) if (Path(sweep_dir) / r["job"] / REPORT).exists()}
    done = sum(r["status"] == "done" for r in rows)
    parts = [
        f"<h1>Sweep {html.escape(Path(sweep_dir).name)}</h1>",
        meta({"directory": str(sweep_dir), "jobs": len(rows), "finished": done}),
        "<h2>Jobs</h2>",
        table(columns, [[r.get(c, "") for c in columns] for r in rows], "jobs", links),
    ]
    if plot is not None and Path(plot).exists():
        parts.append(figure(plot, "systematic features against the threshold"))
    return write(Path(sweep_dir) / REPORT, f"outlier_hydra sweep {Path(sweep_dir).name}", "".join(parts))


def comparison_report(out: Path, rows: list[dict], columns: list[str], plots: dict[str, Path], notes: list[str]) -> Path:
    """<out>/report.html: a row per run, linked to the run's own report, and the comparison plots."""
    import os

    links = {
        n: os.path.relpath(Path(r["run"]) / REPORT, out) for n, r in enumerate(rows) if (Path(r["run"]) / REPORT).exists()
    }

    def short(column: str, value: Any) -> Any:  # paths by their last two parts; the JSON keeps them whole
        return short_name(value) if column in ("run", "model") and isinstance(value, str) else value

    parts = [
        f"<h1>Comparison of {len(rows)} runs</h1>",
        "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        table(columns, [[short(c, r.get(c)) for c in columns] for r in rows], "runs", links),
    ]
    for name, path in plots.items():
        parts.append(figure(path, name.replace("_", " ")))
    return write(Path(out) / REPORT, "outlier_hydra comparison", "".join(parts))
