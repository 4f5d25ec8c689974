"""Deployment configs without a cluster: the sbatch script submitit writes for each Slurm option
holds the expected directives (nothing is submitted), and the VRAM estimate behind
gpus_per_node=auto gives the known parameter counts of the real models."""

import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from outlier_hydra.config import config_dir
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.launch.launcher import executor_parameters, resolved_params
from outlier_hydra.launch.vram import estimate, gpus_per_node
from outlier_hydra.registration import register


def _compose(*overrides):
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def sbatch_script(cfg, tmp_path) -> str:
    """What the project's launcher would submit: its parameters (gpus_per_node=auto resolved as it
    resolves them), its mapping to submitit, submitit's own writer."""
    import submitit

    params = {k: v for k, v in OmegaConf.to_container(cfg.hydra.launcher, resolve=True).items() if k != "_target_"}
    params = resolved_params(params, cfg)
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm", slurm_max_num_timeout=params["max_num_timeout"])
    executor.update_parameters(**executor_parameters(params, "slurm"))
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")


def test_multi_gpu_sbatch_directives(tmp_path):
    cfg = _compose(
        "deployment=slurm_multi_gpu",
        "model=mixtral_8x7b",
        "deployment.partition=gpu",
        "deployment.account=lab",
        "deployment.setup=[module load cuda/12.4]",
        "+deployment.additional_parameters.reservation=mine",
    )
    assert cfg.model.device_map == "balanced"
    expected_gpus = estimate(cfg).gpus_needed(80)
    assert expected_gpus == 2  # Mixtral-8x7B in bf16: 87 GB of weights
    text = sbatch_script(cfg, tmp_path)
    for line in (
        f"#SBATCH --gpus-per-node={expected_gpus}",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=256GB",
        "#SBATCH --time=240",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --reservation=mine",
        "#SBATCH --job-name=outlier_hydra",
        "module load cuda/12.4",
    ):
        assert line in text, line


def test_single_gpu_sbatch_directives(tmp_path):
    text = sbatch_script(_compose("deployment=slurm", "deployment.partition=a100", "deployment.qos=high"), tmp_path)
    for line in (
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --partition=a100",
        "#SBATCH --qos=high",
    ):
        assert line in text, line


def test_every_launcher_key_stays_overridable(tmp_path):
    cfg = _compose("deployment=slurm", "hydra.launcher.gpus_per_node=3", "hydra.launcher.comment=mine")
    text = sbatch_script(cfg, tmp_path)
    assert "#SBATCH --gpus-per-node=3" in text and "#SBATCH --comment=mine" in text


@pytest.mark.parametrize("model,total,active", [("olmoe_1b_7b", 6.92e9, 1.3e9), ("qwen3_30b", 30.5e9, 3.3e9)])
def test_parameter_counts_of_the_real_models(model, total, active):
    est = estimate(_compose(f"model={model}"))
    assert est.source == "model.architecture"  # offline: the config group's numbers, built on the meta device
    assert est.total_params == pytest.approx(total, rel=0.005)
    assert est.active_params == pytest.approx(active, rel=0.03)


def test_auto_gpu_count_and_its_failure():
    cfg = _compose("deployment=slurm_multi_gpu", "model=qwen3_30b", "deployment.min_vram_gb=24")
    assert gpus_per_node(cfg) == 4
    cfg = _compose(
        "deployment=slurm_multi_gpu",
        "model=mixtral_8x7b",
        "deployment.min_vram_gb=24",
        "deployment.allowed_gpu_counts=[1,2]",
    )
    with pytest.raises(
        OutlierHydraError, match=r"deployment\.gpus_per_node=auto: .* no allowed count \(1, 2\) of 24 GB cards fits"
    ):
        gpus_per_node(cfg)


def test_estimator_reads_a_local_config_json(tiny_models):
    est = estimate(_compose("model=local", f"model.name={tiny_models['olmoe']}"))
    assert est.source == "config.json"
    from transformers import AutoModel

    assert est.loaded_params == sum(p.numel() for p in AutoModel.from_pretrained(tiny_models["olmoe"]).parameters())


def test_launcher_waits_while_slurm_still_holds_the_job(tmp_path, monkeypatch):
    """A requeued job whose accounting already reads COMPLETED: the launcher keeps waiting as long
    as the controller lists it as queued or running, and stops once it left without a result."""
    from types import SimpleNamespace

    import outlier_hydra.launch.launcher as launcher
    from outlier_hydra.launch import slurm

    result = tmp_path / "0_result.pkl"
    job = SimpleNamespace(job_id="7", paths=SimpleNamespace(result_pickle=result))
    states = iter(["RUNNING", "REQUEUED", "PENDING", "RUNNING"])

    def status(job_ids):
        s = next(states, None)
        if s is None:  # the requeued run finished and wrote its result
            result.write_bytes(b"done")
            return {}
        return {"7": (s, "None")}

    monkeypatch.setattr(slurm, "queue_status", status)
    launcher.wait_until_settled(job, poll_s=0)
    assert result.exists()

    gone = SimpleNamespace(job_id="8", paths=SimpleNamespace(result_pickle=tmp_path / "never.pkl"))
    monkeypatch.setattr(slurm, "queue_status", lambda job_ids: {})
    monkeypatch.setattr(launcher, "GRACE_S", 0.05)
    t0 = time.monotonic()
    launcher.wait_until_settled(gone, poll_s=0.01)  # returns: results() then reports the failure
    assert 0.05 <= time.monotonic() - t0 < 5, "it waited the grace period for a result, then gave up"

    stuck = SimpleNamespace(job_id="9_0", paths=SimpleNamespace(result_pickle=tmp_path / "no.pkl"))
    monkeypatch.setattr(slurm, "queue_status", lambda job_ids: {"9_0": ("PENDING", "QOSMaxCpuPerJobLimit")})
    with pytest.raises(launcher.JobCannotStart, match="pending for QOSMaxCpuPerJobLimit"):
        launcher.wait_until_settled(stuck, poll_s=0)


@pytest.mark.parametrize(
    "reason,never",
    [
        ("PartitionConfig", True),
        ("PartitionTimeLimit", True),
        ("InvalidQOS", True),
        ("BadConstraints", True),
        ("QOSMaxWallDurationPerJobLimit", True),
        ("AssocMaxGRESPerJob", True),
        ("Resources", False),
        ("Priority", False),
        ("QOSMaxCpuPerUserLimit", False),
        ("AssocGrpCpuLimit", False),
        ("Dependency", False),
    ],
)
def test_which_pending_reasons_never_clear(reason, never):
    from outlier_hydra.launch import slurm

    assert (slurm.never_clears(reason, None) is not None) == never


def test_slurm_time_and_gres_formats():
    from outlier_hydra.launch import slurm

    assert slurm._minutes("infinite") is None and slurm._minutes("1-02:03:00") == 26 * 60 + 3
    assert slurm._minutes("30") == 30 and slurm._minutes("01:30:00") == 90 and slurm._minutes("05:30") == 5.5
    assert slurm._gpus("gpu:2") == 2 and slurm._gpus("gpu:a100:4(S:0-1)") == 4 and slurm._gpus("(null)") == 0


def test_auto_gpu_count_is_resolved_by_the_launcher_not_at_compose(tmp_path, capsys):
    """Composing gpus_per_node=auto reads no model; the launcher resolves it when it submits, and a
    request no allowed count can hold ends the sweep with one line (exit code 2)."""
    cfg = _compose(
        "deployment=slurm_multi_gpu",
        "model=mixtral_8x7b",
        "deployment.min_vram_gb=24",
        "deployment.allowed_gpu_counts=[1,2]",
    )
    assert OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["gpus_per_node"] == "auto"
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    with pytest.raises(SystemExit) as info:
        resolved_params(params, cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("outlier_hydra: error: deployment.gpus_per_node=auto: ")
    local = _compose("deployment=submitit_local", "deployment.gpus_per_node=auto", "model=olmoe_1b_7b")
    assert resolved_params(OmegaConf.to_container(local.hydra.launcher, resolve=True), local)["gpus_per_node"] == 1


@pytest.mark.parametrize(
    "model,total",
    [("gpt_oss_20b", 20.9e9), ("gpt_oss_120b", 116.8e9), ("deepseek_v2_lite", 15.7e9), ("qwen3_next_80b", 79.7e9)],
)
def test_parameter_counts_of_the_new_presets(model, total):
    """Published totals: gpt-oss 20.9B / 116.8B, DeepSeek-V2-Lite 15.7B, Qwen3-Next-80B-A3B 79.7B."""
    est = estimate(_compose(f"model={model}"))
    assert est.source == "model.architecture"
    assert est.total_params == pytest.approx(total, rel=0.005)


def test_mxfp4_checkpoint_is_counted_in_its_stored_bytes():
    """gpt-oss-120b keeps its expert banks in MXFP4 (4 bits + an 8-bit scale per 32 values = 4.25
    bits), the rest in bfloat16: about 61 GiB on disk, so one 80 GB card holds it."""
    est = estimate(_compose("model=gpt_oss_120b"))
    layers, experts, hidden, inter = 36, 128, 2880, 2880
    banks = layers * experts * (hidden * 2 * inter + inter * hidden)  # gate_up_proj + down_proj
    expected = banks * 4.25 / 8 + (est.loaded_params - banks) * 2
    assert est.quantization == "mxfp4"
    assert est.weights_gb * 1024**3 == pytest.approx(expected, rel=1e-9)
    assert est.dequantized_weights_gb * 1024**3 == est.loaded_params * 2
    assert est.weights_gb == pytest.approx(60.8, rel=0.05)  # the checkpoint's size in GiB
    assert est.gpus_needed(80) == 1 and est.gpus_needed(48) == 2


def test_quantization_is_read_from_a_local_config_json(tmp_path):
    """A checkpoint's own quantization_config decides: FP8 (DeepSeek-V3) stores linear weights and
    expert banks in one byte, embeddings and norms in model.dtype."""
    from outlier_hydra.testing.tiny import tiny_config

    config = tiny_config("deepseek_v3")
    config.vocab_size = 128  # so that the weights, not the embeddings, make most of the bytes
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    config.save_pretrained(tmp_path)
    est = estimate(_compose("model=local", f"model.name={tmp_path}", "model.dtype=bfloat16"))
    assert est.source == "config.json" and est.quantization == "fp8"
    assert est.weights_gb < 0.6 * est.dequantized_weights_gb
