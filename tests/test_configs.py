"""The shipped YAML configs parse into the same dataclasses the CLI and Python API use."""

from pathlib import Path

import pytest

from lmforge.options import build, load_yaml
from lmforge.recipes.finetune import FinetuneConfig
from lmforge.recipes.pretrain import PretrainConfig, model_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_builds(path):
    if path.name.startswith("finetune-"):
        cfg = build(FinetuneConfig, load_yaml(path))
        assert cfg.train.steps > 0 and cfg.data
        return
    cfg = build(PretrainConfig, load_yaml(path))
    assert cfg.train.steps > 0
    model_config(cfg.model, vocab_size=65)


def test_yaml_values_are_type_checked_with_the_key_named():
    from lmforge.errors import UserError

    with pytest.raises(UserError, match=r"option train\.steps='many' is not an integer"):
        build(PretrainConfig, {"train": {"steps": "many"}})
    with pytest.raises(UserError, match="unknown option"):
        build(PretrainConfig, {"trian": {}})


def test_overrides_keep_a_recipes_own_nested_defaults():
    from lmforge.recipes.demo import DemoConfig

    cfg = build(DemoConfig, {"train": {"progress": False}})
    assert cfg.train.progress is False
    assert (cfg.train.steps, cfg.train.lr) == (DemoConfig().train.steps, DemoConfig().train.lr)
    assert cfg.data.max_bytes == DemoConfig().data.max_bytes
