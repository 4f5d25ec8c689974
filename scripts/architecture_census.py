"""Census: every causal-LM model type of the installed transformers, built tiny and run end to end.

For each type in transformers' causal-LM auto mapping: shrink its config (outlier_hydra/testing/tiny.py),
build a random model with an outlier planted in the embeddings (dim 13 at every 7th token id), run
the full default pipeline on it (8 x 32 tokens of the shipped corpus, every default stage), and check
the run against an independent recomputation from plain hooks (tests/helpers.py: the systematic
features, and for MoE layers the routing the model really does). Each type runs in its own process.

  python scripts/architecture_census.py                 # all types -> docs/architectures.md
  python scripts/architecture_census.py llama olmoe     # some types, printed
  python scripts/architecture_census.py --update jetmoe # rerun some types, rewrite their rows
  python scripts/architecture_census.py --one llama     # one type, one JSON line (what the census calls)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLANT_DIM = 13
# Families discovery cannot decide, added from the command line as a user would (model.structure)
OVERRIDES = {
    "jetmoe": ["model.structure.mixer=layers.*.self_attention", "model.structure.mlp=layers.*.mlp"],
}


def one(model_type: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.path.insert(0, str(REPO / "tests"))
    import numpy as np
    from helpers import (
        layer_problems,
        mismatches,
        module_input_tables,
        plant_super_weight,
        stacked,
        sub_block_inputs,
        super_weight_problems,
        super_weight_site,
    )

    from outlier_hydra.config import corpus_path
    from outlier_hydra.errors import OutlierHydraError
    from outlier_hydra.models.configs import config_top_k
    from outlier_hydra.pipeline import run
    from outlier_hydra.testing.tiny import build, tiny_config
    from outlier_hydra.tools.args import compose_config

    row: dict = {"model_type": model_type, "built": False, "analysed": False}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        try:
            config = tiny_config(model_type)
            build(model_type, folder, PLANT_DIM)
        except Exception as exc:  # noqa: BLE001 - the census reports every failure
            row["reason"] = _first_line(exc)
            row["excluded"] = "encoder-decoder" in row["reason"]
            return row
        row["built"] = True
        overrides = [
            "progress=false",
            "plots=false",
            "model=local",
            f"model.name={folder}",
            f"model.tokenizer={folder / 'tokenizer'}",
            "dataset=local",
            f"dataset.data_files={corpus_path('jargon_file_4.4.7_intro.txt')}",
            "dataset.num_sequences=8",
            "dataset.sequence_length=32",
            "analysis.batch_size=4",
            *OVERRIDES.get(model_type, []),
        ]
        row["overrides"] = OVERRIDES.get(model_type, [])
        try:
            results = run(compose_config(overrides), Path(tmp) / "run")
        except OutlierHydraError as exc:
            row["reason"] = str(exc).replace(str(folder), "<tiny model>")
            row["seconds"] = round(time.perf_counter() - t0, 1)
            return row
        except Exception as exc:  # noqa: BLE001
            row["reason"] = f"{type(exc).__name__}: {_first_line(exc)}"
            row["seconds"] = round(time.perf_counter() - t0, 1)
            return row
        structure = results["model"]["structure"]
        points = structure["hook_points"]
        routers = structure["routers"]
        row.update(
            analysed=True,
            hook_points=_hook_point_summary(points),
            reads=sorted({p["reads"] for p in points}),
            layers_without_mlp=structure["layers_without_mlp"],
            moe_layers=structure["moe_layers"],
            dense_mlp_layers=structure["dense_mlp_layers"],
            routers=sorted({r["router"].split(".", 2)[-1] for r in routers.values()}),
            shared_experts=sorted({s.split(".", 2)[-1] for r in routers.values() for s in r["shared_experts_always_on"]}),
            planted_found=any(r["feature_dim"] == PLANT_DIM for r in results["systematic_outliers"]),
        )
        ids = np.load(Path(tmp) / "run" / "token_ids.npy")
        moe = {int(i): (_mlp_of(points, int(i)), r["router"], r["experts"]) for i, r in routers.items()}
        acts, tables = module_input_tables(
            folder, [p["module"] for p in points], moe, ids, batch_size=4, top_k=config_top_k(config)
        )
        problems = mismatches(results, acts, tables)
        # what enters each layer's sub-blocks, found by the reference's own rule (not discovery's choice)
        inputs = sub_block_inputs(folder, ids, batch_size=4)
        layers = layer_problems(results, inputs)
        problems += layers or [f"sub-blocks: {m}" for m in mismatches(results, stacked(inputs), tables)]
        row["sub_blocks_agree"] = not layers
        row["recomputation_agrees"] = not problems
        if problems:
            row["reason"] = "; ".join(problems)[:300]
        row["routing_checked"] = bool(tables) and not problems
        experts = results.get("experts")
        if routers and experts is not None:  # the experts stage's per-expert rows = the routing's choices
            rows = {(u["layer"], u["expert"]): u["tokens"] for u in experts["units"] if u["kind"] == "routed"}
            unobserved = set(experts.get("unobserved_layers", []))
            agree = all(
                rows.get((layer["layer"], e)) == n
                for layer in results["moe_routing"]["layers"]
                if layer["layer"] not in unobserved
                for e, n in enumerate(layer["tokens_per_expert"])
            )
            row["experts_stage"] = "unobserved" if unobserved and agree else agree
            site = super_weight_site(results)
            if site is not None:  # plant a super weight in one expert: the stage must find it exactly
                layer, experts_path, expert = site
                try:
                    value = plant_super_weight(folder, experts_path, expert)
                    planted = run(compose_config(overrides), Path(tmp) / "planted")
                    problems = super_weight_problems(planted["experts"], layer, expert, value)
                except Exception as exc:  # noqa: BLE001 - the census reports every failure
                    problems = [f"{type(exc).__name__}: {_first_line(exc)}"]
                row["super_weight"] = f"L{layer} E{expert}" if not problems else "; ".join(problems)[:200]
                row["super_weight_found"] = not problems
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _mlp_of(points: list[dict], layer: int) -> str:
    return next(p["module"] for p in points if p["name"] == f"layer_{layer}_ln_mlp")


def _hook_point_summary(points: list[dict]) -> str:
    """e.g. 'layers.{i}.self_attn / layers.{i}.mlp' (every layer's pattern, distinct ones joined)."""
    import re

    def template(path):
        return re.sub(r"\.\d+\.", ".{i}.", path, count=1)

    attn = sorted({template(p["module"]) for p in points if p["name"].endswith("_ln_attn")})
    mlp = sorted({template(p["module"]) for p in points if p["name"].endswith("_ln_mlp")})
    return f"{' | '.join(attn)} / {' | '.join(mlp) or '(no MLP)'}"


def _first_line(exc: BaseException) -> str:
    from outlier_hydra.errors import first_line

    return first_line(exc, 200)


def in_subprocess(model_type: str, timeout: int = 600) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", model_type], capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return {"model_type": model_type, "built": True, "analysed": False, "reason": f"over {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model_type": model_type, "built": False, "analysed": False, "reason": f"crashed: {tail[:200]}"}
    return json.loads(lines[-1])


def write_markdown(rows: list[dict], path: Path) -> None:
    import transformers

    decoder = [r for r in rows if not r.get("excluded")]
    built = [r for r in decoder if r["built"]]
    analysed = [r for r in built if r["analysed"]]
    agree = [r for r in analysed if r.get("recomputation_agrees")]
    blocks = [r for r in analysed if r.get("sub_blocks_agree")]
    moe = [r for r in analysed if r.get("moe_layers")]
    experts_ok = [r for r in moe if r.get("experts_stage") is True]
    planted = [r for r in moe if "super_weight_found" in r]
    found = [r for r in planted if r["super_weight_found"]]
    lines = [
        "# Architecture census",
        "",
        f"Generated by `make census` (`scripts/architecture_census.py`) with transformers {transformers.__version__}.",
        "Every model type in its causal-LM auto mapping is built tiny (hidden 64, 4 layers, 8 experts",
        "choosing 2: `outlier_hydra/testing/tiny.py`) with an outlier planted in the embeddings (dim 13),",
        "run through the full default pipeline (8 x 32 tokens, every default stage), and checked against",
        "an independent recomputation from plain hooks (`tests/helpers.py`): the systematic features and,",
        "for MoE layers, the routing the model really does; and, by the reference's own rule (plain hooks",
        "on every child of every layer), what enters each layer's sub-blocks: a layer reported without a",
        "mixer or MLP must be one that has none, and the features recomputed from those inputs must agree.",
        '"experts stage": its per-expert token counts',
        "equal the routing's (the stage reads the fused experts' matmuls). \"super weight planted\": where",
        "the stage reads the experts, a second run of the same model with one down_proj weight of the",
        "most-routed expert of the first such layer set to 1000 x the bank's largest |w| (row 7, col 5):",
        "the stage must name that layer and expert its only super expert and that weight its first",
        "super-weight candidate. Regenerate it whenever transformers is bumped.",
        "",
        f"- model types: {len(rows)}; encoder-decoder (excluded): {len(rows) - len(decoder)}",
        f"- decoder-only types that build tiny on a CPU: {len(built)} of {len(decoder)}",
        f"- analysed end to end: **{len(analysed)} of {len(built)}** ({100 * len(analysed) / max(len(built), 1):.0f}%)",
        f"- of those, equal to the recomputation: {len(agree)}; MoE types with routers found: {len(moe)}, "
        f"with the experts stage's counts equal to the routing: {len(experts_ok)}",
        f"- every layer's hook points equal to the sub-blocks the reference finds: {len(blocks)} of {len(analysed)}",
        f"- planted super weights found at their layer, expert, row and column: {len(found)} of {len(planted)}",
        "",
        "| model type | built | analysed | hook points (mixer input / MLP input) | MoE layers | routers | "
        "shared experts | recomputation | experts stage | super weight planted | planted dim found | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("reason", "")
        if r.get("overrides"):
            note = (note + "; " if note else "") + "with " + " ".join(f"`{o}`" for o in r["overrides"])
        if r.get("layers_without_mlp"):
            note = (note + "; " if note else "") + f"layers without MLP: {r['layers_without_mlp']}"
        if r.get("moe_layers") and r.get("dense_mlp_layers"):
            note = (note + "; " if note else "") + f"dense MLP layers: {r['dense_mlp_layers']}"
        cells = [
            f"`{r['model_type']}`",
            "yes" if r["built"] else ("excluded" if r.get("excluded") else "no"),
            "yes" if r["analysed"] else ("" if not r["built"] else "**no**"),
            f"`{r['hook_points']}`" if r.get("hook_points") else "",
            ",".join(map(str, r.get("moe_layers", []))),
            ", ".join(f"`{x}`" for x in r.get("routers", [])),
            ", ".join(f"`{x}`" for x in r.get("shared_experts", [])),
            {True: "equal", False: "**differs**"}.get(r.get("recomputation_agrees"), ""),  # type: ignore[call-overload]
            {True: "tokens agree", False: "**differs**", "unobserved": "not given the choices"}.get(  # type: ignore[call-overload]
                r.get("experts_stage"), ""
            ),
            _super_weight_cell(r),
            {True: "yes", False: "no"}.get(r.get("planted_found"), ""),  # type: ignore[call-overload]
            str(r.get("seconds", "")),
            note.replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")  # the rows, for --update


def _super_weight_cell(row: dict) -> str:
    if "super_weight_found" not in row:
        return ""
    text = str(row["super_weight"]).replace("|", "/")
    return f"found at {text}" if row["super_weight_found"] else f"**{text}**"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="*", help="model types (default: all)")
    parser.add_argument("--one", help="run one model type in this process and print its row as JSON")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--update", action="store_true", help="rerun the given types and rewrite their rows")
    parser.add_argument("--out", default=str(REPO / "docs" / "architectures.md"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    from outlier_hydra.testing.tiny import causal_lm_types

    types = args.types or causal_lm_types()
    rows: list[dict] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(in_subprocess, types):
            rows.append(row)
            status = "analysed" if row["analysed"] else ("built" if row["built"] else "not built")
            print(f"{row['model_type']:<28} {status:<10} {row.get('reason', '')[:110]}", flush=True)
    if args.update:
        saved = {r["model_type"]: r for r in json.loads(Path(args.out).with_suffix(".json").read_text())}
        saved.update({r["model_type"]: r for r in rows})
        rows = [saved[t] for t in sorted(saved)]
    if not args.types or args.update:
        write_markdown(rows, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
