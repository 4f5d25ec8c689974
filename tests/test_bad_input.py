"""Bad input ends with one clear line naming the key or file, before any weight loads, and leaves no
results behind."""

import re
import subprocess
import sys

import pytest
from conftest import REPO, make_cfg, tiny_overrides

import outlier_hydra.pipeline.job as run_module
import outlier_hydra.pipeline.plan as plan_module
from outlier_hydra.errors import OutlierHydraError


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the run gets as far as loading weights."""

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(plan_module, "load_model", refuse)


def _fails(overrides, match, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OutlierHydraError, match=match):
        run_module.run(make_cfg(*overrides), out)
    assert not (out / "final_analysis_results.json").exists()
    assert not out.exists() or not any(out.iterdir()), "nothing may be written for bad input"


@pytest.fixture
def olmoe(tiny_models):
    return tiny_models["olmoe"]


CASES = {
    "threshold_zero": (["analysis.magnitude_threshold=0"], r"analysis\.magnitude_threshold: must be > 0"),
    "threshold_negative": (["analysis.magnitude_threshold=-6"], r"analysis\.magnitude_threshold"),
    "layer_pct_zero": (["analysis.min_layer_percentage=0"], r"analysis\.min_layer_percentage: must be in \(0, 1\]"),
    "seq_pct_above_one": (["analysis.min_seq_percentage=6"], r"analysis\.min_seq_percentage: must be in \(0, 1\]"),
    "chunk_layers_zero": (["analysis.chunk_layers=0"], r"analysis\.chunk_layers"),
    "batch_size_zero": (["analysis.batch_size=0"], r"analysis\.batch_size"),
    "num_sequences_zero": (["dataset.num_sequences=0"], r"dataset\.num_sequences"),
    "target_not_allowed": (
        ["analysis.collector._target_=os.system"],
        r"analysis\.collector\._target_: os\.system is outside outlier_hydra; allow it explicitly with allowed_targets=\[os\.\]",
    ),
    "bad_collector_target": (
        ["analysis.collector._target_=no_such_module.Collector", "allowed_targets=[no_such_module.]"],
        r"analysis\.collector\._target_: cannot import",
    ),
    "unknown_stage": (
        ["+analysis.stages.no_such_stage={enabled: true}"],
        r"analysis\.stages\.no_such_stage: no stage named 'no_such_stage'",
    ),
    "stage_setting_type": (
        ["analysis.stages.moe_routing=null", "+analysis.stages.moe_routing={enabled: true, top_experts: many}"],
        r"analysis\.stages\.moe_routing\.top_experts: ",
    ),
    "stage_setting_range": (
        ["analysis.stages.experts.top_tokens=-1"],
        r"analysis\.stages\.experts\.top_tokens: must be >= 0, got -1",
    ),
    "target_signature": (
        ["analysis.analyzer._target_=outlier_hydra.collect.OutlierCollector"],
        r"analysis\.analyzer: .* does not take",
    ),
    "layer_out_of_range": (["analysis.layers=[1,4]"], r"analysis\.layers: layer 4 is out of range; .* has 4 layers"),
    "layers_empty": (["analysis.layers=[]"], r"analysis\.layers: empty"),
    "sequence_too_long": (
        ["dataset.sequence_length=300"],
        r"dataset\.sequence_length: 300 is longer than the model allows \(max_position_embeddings=256\)",
    ),
    "corpus_too_short": (
        ["dataset.num_sequences=1000", "dataset.sequence_length=256"],
        r"dataset: .* gave \d+ tokens, but .* = 256000 are needed",
    ),
    "no_such_data_file": (
        ["dataset.data_files=/nonexistent/*.txt"],
        r"dataset\.data_files: no file matches /nonexistent/\*\.txt",
    ),
    "cuda_without_gpu": (["model.device_map=cuda"], r"model\.device_map=cuda but no CUDA device"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_value(case, olmoe, no_weights, tmp_path):
    if case == "cuda_without_gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    extra, match = CASES[case]
    _fails(tiny_overrides(olmoe, *extra), match, tmp_path)


def test_unknown_model_path(no_weights, tmp_path):
    _fails(tiny_overrides("/nonexistent/model"), r"model\.name: no such directory: /nonexistent/model", tmp_path)


def test_directory_without_config(no_weights, tmp_path):
    (tmp_path / "empty_model").mkdir()
    _fails(tiny_overrides(tmp_path / "empty_model"), r"model\.name: .*empty_model has no config\.json", tmp_path)


def test_hub_id_while_offline(no_weights, tmp_path):
    _fails(
        tiny_overrides("no-such-org/no-such-model"),
        r"model\.name: cannot load 'no-such-org/no-such-model': not a local directory, and HF_HUB_OFFLINE=1",
        tmp_path,
    )


def test_empty_corpus(olmoe, no_weights, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(tiny_overrides(olmoe, f"dataset.data_files={empty}"), r"dataset: .*empty\.txt gave 0 tokens", tmp_path)


def test_jsonl_without_the_text_field(olmoe, no_weights, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"body": "some words here"}\n')
    _fails(
        tiny_overrides(olmoe, f"dataset.data_files={f}"),
        r"dataset\.text_field: .* has no field 'text' \(fields: body\)",
        tmp_path,
    )


def test_cli_prints_one_line_and_exits_nonzero(olmoe, tmp_path):
    out = tmp_path / "cli_run"
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", *tiny_overrides(olmoe, "analysis.layers=[7]"), f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("outlier_hydra: error:")]
    assert lines == [f"outlier_hydra: error: analysis.layers: layer 7 is out of range; {olmoe} has 4 layers (0..3)"]
    assert "Traceback" not in proc.stderr
    assert not (out / "final_analysis_results.json").exists()


@pytest.mark.parametrize("override,key", [("model.dtype=float8", "model.dtype"), ("analysis.thresold=4", "thresold")])
def test_cli_schema_errors_name_the_key(override, key, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", override, f"hydra.run.dir={tmp_path}/x"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert key in proc.stderr
    assert not (tmp_path / "x").exists()


def test_hub_dataset_while_offline(olmoe, no_weights, tmp_path):
    _fails(
        tiny_overrides(olmoe, "dataset=hub", "dataset.sequence_length=32", "dataset.name=no-such-org/no-such-data"),
        r"dataset\.name: cannot open no-such-org/no-such-data: .*Offline",
        tmp_path,
    )


def test_debug_flag_shows_the_traceback(olmoe, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "outlier_hydra",
            *tiny_overrides(olmoe, "analysis.layers=[7]"),
            "debug=true",
            f"hydra.run.dir={tmp_path}/x",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "OutlierHydraError" in proc.stderr


@pytest.mark.parametrize("case", sorted(set(CASES) - {"cuda_without_gpu"}))
def test_bad_value_on_the_command_line_is_one_line_and_exit_code_2(case, olmoe, tmp_path):
    """Every case above, as a user meets it: exit code 2, one stderr line naming the key, and nothing
    in the run directory but Hydra's own record of the command."""
    extra, match = CASES[case]
    out = tmp_path / "cli_run"
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", *tiny_overrides(olmoe, *extra), f"hydra.run.dir={out}", "progress=false"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outlier_hydra: error: "), proc.stderr[-2000:]
    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.name for p in out.iterdir()) == [".hydra", "outlier_hydra.log"]


def test_a_bad_triton_launch_shape_in_the_environment_is_one_line_before_loading(olmoe, no_weights, tmp_path, monkeypatch):
    """$OUTLIER_HYDRA_TRITON_BLOCKS (the GPU kernel's tuning override) is read when the collector is
    built, before any weights: a bad value names the variable, in a run and on the command line."""
    from outlier_hydra.collect import fused_triton

    monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", "64,32")
    fused_triton.launch_shape.cache_clear()
    try:
        _fails(tiny_overrides(olmoe), r"OUTLIER_HYDRA_TRITON_BLOCKS: '64,32' is not rows,cols,programs,warps", tmp_path)
    finally:
        fused_triton.launch_shape.cache_clear()
    out = tmp_path / "cli_run"
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_hydra", *tiny_overrides(olmoe), f"hydra.run.dir={out}", "progress=false"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (
        "outlier_hydra: error: OUTLIER_HYDRA_TRITON_BLOCKS: '64,32' is not rows,cols,programs,warps[,elementwise 0-2]"
    )
