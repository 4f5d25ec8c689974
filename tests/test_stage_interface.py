"""The Stage interface from a user's side, and saved runs as data.

A stage of one's own is one module plus one YAML file (tests/outlier_positions_stage.py and
tests/conf/analysis/stages/outlier_positions.yaml): it runs in the same passes, its section lands in
the result files, its statistics merge across shards and survive reanalysis, its plot is drawn.
A crafted run directory cannot make merge or reanalyze import or call anything the command line
did not allow."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_cfg, tiny_overrides
from helpers import LAYERS, full_activations

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.pipeline import run
from outlier_hydra.tools.merge import merge_runs
from outlier_hydra.tools.reanalyze import reanalyze

OWN_STAGE = [
    f"hydra.searchpath=[file://{REPO}/tests/conf]",
    "analysis/stages=[moe_routing,outlier_positions]",
    "allowed_targets=[outlier_positions_stage.]",
]


def _expected(model_dir, token_ids, batch_size=4):
    acts = full_activations(
        model_dir, [f"layers.{i}.post_attention_layernorm" for i in range(LAYERS)], token_ids, batch_size
    )
    return [
        {"layer": i, "tokens": acts.shape[1], "outlier_positions": int((np.abs(acts[i]) >= 6).any(-1).sum())}
        for i in range(LAYERS)
    ]


def test_a_stage_of_ones_own_is_one_module_and_one_yaml_file(tiny_models, tmp_path):
    results = run(make_cfg(*tiny_overrides(tiny_models["olmoe"]), *OWN_STAGE), tmp_path / "run")
    token_ids = np.load(tmp_path / "run" / "token_ids.npy")
    expected = _expected(tiny_models["olmoe"], token_ids)
    assert results["outlier_positions"]["layers"] == expected
    assert sum(e["outlier_positions"] for e in expected) > 0
    assert "moe_routing" in results  # the built-in stages still run beside it
    first_batch = json.loads((tmp_path / "run" / "batch_001_results.json").read_text())
    assert first_batch["outlier_positions"]["layers"] == _expected(tiny_models["olmoe"], token_ids[:4])
    assert (tmp_path / "run" / "plots" / "outlier_positions.png").stat().st_size > 1000

    # reanalysis rebuilds it from the run's config, with the command line's permission
    again, _ = reanalyze(tmp_path / "run", ["analysis.min_seq_percentage=0.1", "allowed_targets=[outlier_positions_stage.]"])
    assert again["outlier_positions"] == results["outlier_positions"]
    with pytest.raises(
        OutlierHydraError,
        match=r"analysis\.stages\.outlier_positions\._target_: outlier_positions_stage\."
        r"OutlierPositions is outside outlier_hydra",
    ):
        reanalyze(tmp_path / "run", ["analysis.min_seq_percentage=0.1"])


def test_own_stage_statistics_merge_across_shards(tiny_models, tmp_path):
    single = run(make_cfg(*tiny_overrides(tiny_models["qwen3_moe"]), *OWN_STAGE), tmp_path / "all")
    for i in range(2):
        run(
            make_cfg(
                *tiny_overrides(tiny_models["qwen3_moe"], "dataset.num_sequences=4", f"dataset.skip_sequences={4 * i}"),
                *OWN_STAGE,
            ),
            tmp_path / f"s{i}",
        )
    merged = merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", ["outlier_positions_stage."])
    assert merged == json.loads(json.dumps(single))


@pytest.fixture
def finished_run(tiny_models, tmp_path):
    run(make_cfg(*tiny_overrides(tiny_models["mixtral"], "dataset.num_sequences=4")), tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """An importable module that leaves a marker file if anything imports it."""
    marker = tmp_path / "canary_was_imported"
    (tmp_path / "canary_pkg").mkdir()
    (tmp_path / "canary_pkg" / "canary.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\ndef boom(*a, **k):\n    raise SystemExit('called')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "canary_pkg"))
    yield marker
    assert not marker.exists(), "a crafted run directory made a command import code"
    sys.modules.pop("canary", None)


def _edit_config(run_dir, change):
    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


OUTSIDE = "canary\\.boom is outside outlier_hydra"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c["analysis"]["analyzer"].update(_target_="canary.boom"), rf"analysis\.analyzer\._target_: {OUTSIDE}"),
        (
            lambda c: c["analysis"]["stages"]["moe_routing"].update(_target_="canary.boom"),
            rf"analysis\.stages\.moe_routing\._target_: {OUTSIDE}",
        ),
        (
            lambda c: c["analysis"]["analyzer"].update(num_examples={"_target_": "canary.boom"}),  # nested: refused by type
            r"config\.json: analysis\.analyzer\.num_examples: Value .* could not be converted to Integer",
        ),
    ],
    ids=["analyzer", "stage", "nested"],
)
def test_a_crafted_config_cannot_import_anything(change, message, finished_run, canary, tmp_path):
    # the saved allowed_targets is ignored: only the reading command's own command line counts
    _edit_config(finished_run, lambda c: (change(c), c.update(allowed_targets=["canary."])))
    with pytest.raises(OutlierHydraError, match=message):
        reanalyze(finished_run, ["analysis.magnitude_threshold=4"])
    with pytest.raises(OutlierHydraError, match=message):
        merge_runs([finished_run], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_nested_targets_are_checked_too():
    from omegaconf import OmegaConf

    from outlier_hydra.config.targets import check_allowed

    node = OmegaConf.create(
        {"_target_": "outlier_hydra.analysis.SystematicOutlierAnalysis", "extra": {"inner": [{"_target_": "canary.boom"}]}}
    )
    with pytest.raises(
        OutlierHydraError, match=r"^analysis\.analyzer\.extra\.inner\[0\]\._target_: canary\.boom is outside"
    ):
        check_allowed(node, "analysis.analyzer", [])
    check_allowed(node, "analysis.analyzer", ["canary."])


def test_a_crafted_statistics_file_cannot_name_a_stage(finished_run, canary, tmp_path):
    path = finished_run / "stats" / "batch_001.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    from outlier_hydra.stats.outlier_stats import _checksum  # a crafted file can carry a valid checksum

    meta["extras"] = ["canary"]
    arrays["extra.canary.x"] = np.zeros(1)
    meta["sha256"] = _checksum({k: v for k, v in arrays.items() if k != "meta"})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(
        OutlierHydraError, match=r"batch_001\.npz: holds statistics of the stage 'canary', which is not configured"
    ):
        reanalyze(finished_run, ["analysis.magnitude_threshold=4"])
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", "merge", str(finished_run), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds statistics of the stage 'canary'" in proc.stderr
    assert not (tmp_path / "m").exists()
