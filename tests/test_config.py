import pytest

from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import UserError
from lmforge.models import CausalLM


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_json(name, tmp_path):
    cfg = ModelConfig.from_preset(name)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg


def test_gpt2_preset_has_gpt2s_parameter_count():
    assert CausalLM(ModelConfig.from_preset("gpt2")).num_parameters() == 124_439_808


def test_overrides_apply_on_top_of_a_preset():
    cfg = ModelConfig.from_preset("gpt2", n_layers=2, positions="rope")
    assert (cfg.n_layers, cfg.positions, cfg.d_model) == (2, "rope", 768)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=100, n_heads=3), "not divisible by model.n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "must divide model.n_heads"),
        (dict(norm="batchnorm"), "model.norm='batchnorm'"),
        (dict(positions="alibi"), "model.positions='alibi'"),
        (dict(mlp="tanh"), "model.mlp='tanh'"),
        (dict(dropout=1.5), "model.dropout=1.5"),
        (dict(n_layers=0), "model.n_layers=0"),
        (dict(d_model=36, n_heads=12, positions="rope"), "even head_dim"),
    ],
)
def test_invalid_combinations_name_the_value(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_preset("tiny", **overrides)


def test_unknown_preset_and_unknown_key_are_clear():
    with pytest.raises(UserError, match="unknown model preset 'gpt5'; choose one of"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(UserError, match="unknown model config key"):
        ModelConfig.from_dict({"d_model": 64, "hidden": 3})


def test_gated_mlp_defaults_to_two_thirds_width_rounded():
    cfg = ModelConfig.from_preset("tiny-llama", d_model=96)
    assert cfg.hidden_size == 256  # 8*96/3 = 256
    assert ModelConfig.from_preset("tiny").hidden_size == 4 * 64
