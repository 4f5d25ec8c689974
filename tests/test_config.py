"""The config tree: every option of every group composes into the typed schema, every experiment
preset holds what it promises, every `_target_` instantiates, and type/key errors name the key."""

import pytest
from conftest import REPO, make_cfg
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from outlier_hydra.analysis import SystematicOutlierAnalysis
from outlier_hydra.collect import OutlierCollector
from outlier_hydra.config.schema import Config

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_groups_exist():
    assert {"model", "dataset", "analysis", "deployment", "logger", "experiment"} <= set(GROUPS)
    models = {o for g, o in OPTIONS if g == "model"}
    assert {"minilm_l6", "olmoe_1b_7b", "qwen3_30b", "mixtral_8x7b"} <= models


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_into_the_schema(group, option):
    cfg = make_cfg(f"{group}={option}")
    assert OmegaConf.get_type(cfg) is Config
    # the whole tree resolves (`???` is allowed: model=local / dataset=local ask the user for a path)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    collector = instantiate(cfg.analysis.collector)
    analyzer = instantiate(cfg.analysis.analyzer)
    assert isinstance(collector, OutlierCollector) and isinstance(analyzer, SystematicOutlierAnalysis)
    assert collector.magnitude_threshold == analyzer.magnitude_threshold == cfg.analysis.magnitude_threshold


def test_reference_experiments():
    tiny = make_cfg("experiment=olmoe_tiny")
    assert tiny.model.name == "allenai/OLMoE-1B-7B-0125-Instruct"
    assert (tiny.dataset.num_sequences, tiny.dataset.sequence_length) == (2, 512)
    assert list(tiny.analysis.layers) == [0, 1, 2, 3]

    base = make_cfg("experiment=olmoe_baseline")
    assert base.model.architecture.model_type == "olmoe" and base.model.name.startswith("allenai/OLMoE-1B-7B")
    assert (base.dataset.num_sequences, base.dataset.sequence_length) == (4, 2048)
    assert base.analysis.layers is None

    qwen = make_cfg("experiment=qwen_medium")
    assert qwen.model.name == "Qwen/Qwen3-30B-A3B" and qwen.model.device_map == "balanced"
    assert qwen.analysis.chunk_layers == 8 and qwen.analysis.layers is None
    assert (qwen.dataset.num_sequences, qwen.dataset.sequence_length) == (4, 2048)
    assert qwen.dataset.name == "HuggingFaceFW/fineweb-edu" and qwen.dataset.streaming
    assert qwen.dataset.source.value == "hub"


def test_four_moe_models_experiment_sweeps_the_four_models():
    """experiment=four_moe_models: a -m sweep over the older tool's four models on 16 x 2048 tokens
    of FineWeb-Edu; each model preset composes with it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from outlier_hydra.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=four_moe_models"], return_hydra_config=True)
    models = cfg.hydra.sweeper.params.model.split(",")
    assert models == ["olmoe_1b_7b", "qwen3_30b", "mixtral_8x7b", "gpt_oss_120b"]
    assert (cfg.dataset.num_sequences, cfg.dataset.sequence_length) == (16, 2048)
    assert cfg.dataset.name == "HuggingFaceFW/fineweb-edu" and cfg.analysis.layers is None
    for model in models:
        one = make_cfg("experiment=four_moe_models", f"model={model}")
        assert one.model.architecture.num_hidden_layers > 0
    assert make_cfg("experiment=four_moe_models", "model=gpt_oss_120b").model.architecture.quantization == "mxfp4"


@pytest.mark.parametrize(
    "name,model",
    [("super_experts_qwen3_30b", "Qwen/Qwen3-30B-A3B"), ("super_experts_mixtral", "mistralai/Mixtral-8x7B-v0.1")],
)
def test_super_expert_presets_follow_the_paper(name, model):
    cfg = make_cfg(f"experiment={name}")
    assert cfg.model.name == model and (cfg.dataset.num_sequences, cfg.dataset.sequence_length) == (100, 2048)
    e = cfg.analysis.stages.experts
    assert e.enabled and (e.super_percentile, e.super_fraction) == (99.5, 0.1)
    assert cfg.analysis.stages.massive_activations.enabled and cfg.analysis.stages.massive_routing.enabled
    assert cfg.analysis.layers is None


def test_issue_command_line_composes():
    cfg = make_cfg("model=qwen3_30b", "analysis.chunk_layers=8")
    assert cfg.analysis.chunk_layers == 8 and cfg.analysis.collector.chunk_layers == 8
    assert cfg.model.architecture.num_hidden_layers == 48


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.dtype=float8", "model.dtype"),
        ("analysis.magnitude_threshold=big", "analysis.magnitude_threshold"),
        ("dataset.num_sequences=1.5", "dataset.num_sequences"),
        ("analysis.chunk_layers=some", "analysis.chunk_layers"),
    ],
)
def test_wrong_type_fails_at_compose_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        make_cfg(override)
    assert key in str(info.value) + str(info.value.__cause__)


def test_unknown_key_fails_at_compose_naming_the_key():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        make_cfg("model.nmae=foo")
    assert "nmae" in str(info.value) + str(info.value.__cause__)
