"""Bad configuration values fail early with a ValueError that names the field, its value and what is allowed: at
construction, and (for fields set after construction, like `from_pretrained(path, field=value)` overrides) when a
model is built from the configuration, before any layer is."""

import pytest
from transformers import AutoModelForCausalLM

from modeling_mom import ModuleFormerForCausalLM, MoEUTForCausalLM, MoMForCausalLM

from . import test_moduleformer, test_moeut, test_mom

ARCHS = {
    "mom": (test_mom.tiny_config, MoMForCausalLM, "layer_norm_epsilon"),
    "moeut": (test_moeut.tiny_config, MoEUTForCausalLM, "layer_norm_eps"),
    "moduleformer": (test_moduleformer.tiny_config, ModuleFormerForCausalLM, "layer_norm_epsilon"),
}


def common_bad_values(epsilon: str):
    return [
        ({"hidden_act": "gelu_nwe"}, "hidden_act='gelu_nwe' is not a transformers activation"),
        ({epsilon: 0.0}, f"{epsilon}=0.0 must be > 0"),
        ({"initializer_range": -0.1}, "initializer_range=-0.1 must be >= 0"),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_common_fields_are_checked_at_construction(arch):
    make_config, _, epsilon = ARCHS[arch]
    for overrides, message in common_bad_values(epsilon):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            make_config(**overrides)


@pytest.mark.parametrize("arch", ARCHS)
def test_overrides_after_construction_are_checked_before_the_model_is_built(arch, tmp_path):
    make_config, model_class, epsilon = ARCHS[arch]
    model_class(make_config()).save_pretrained(tmp_path)
    for overrides, message in common_bad_values(epsilon):
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(tmp_path, **overrides)
    config = make_config()
    config.hidden_act = "nope"
    with pytest.raises(ValueError, match="hidden_act='nope'"):
        model_class(config)


def test_mom_structure_changed_after_construction():
    """Changing the structure of a saved MoM config without its derived depth used to load, then fail inside the
    cache at generation."""
    config = test_mom.tiny_config()
    config.num_rounds = 2
    with pytest.raises(ValueError, match=r"num_hidden_layers=\d+ does not match .* pass num_hidden_layers=\d+ too"):
        MoMForCausalLM(config)
    config.router_type = "lstm"
    with pytest.raises(ValueError, match="router_type='lstm'; allowed: \\('mlp', 'gru'\\)"):
        config.validate_architecture()


def test_mom_dropouts_and_positions():
    with pytest.raises(ValueError, match=r"embd_dropout=1.5; allowed: \[0, 1\)"):
        test_mom.tiny_config(embd_dropout=1.5)
    with pytest.raises(ValueError, match="max_position_embeddings=0 must be a positive integer"):
        test_mom.tiny_config(max_position_embeddings=0)
    with pytest.raises(ValueError, match="router_aux_loss_coef=-1.0 must be >= 0"):
        test_mom.tiny_config(router_aux_loss_coef=-1.0)


def test_moeut_partial_rope_that_rotates_nothing():
    """0.05 of a 10-wide head rounds down to 0 rotated dims: no positional information at all, silently."""
    with pytest.raises(ValueError, match="partial_rotary_factor=0.05 rotates no dims"):
        test_moeut.tiny_config(partial_rotary_factor=0.05)
    assert test_moeut.tiny_config(partial_rotary_factor=0.0).num_rotary_dims == 0  # explicitly no RoPE: allowed


def test_saving_a_config_changed_into_a_bad_one_fails(tmp_path):
    config = test_moeut.tiny_config()
    config.num_experts_per_tok = 99
    with pytest.raises(Exception, match="num_experts_per_tok=99"):  # `@strict` wraps the ValueError in its own error
        config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "config" / "config.json").exists()
