"""Bad configuration values fail early with a ValueError that names the field, its value and what is allowed: at
construction, and (for fields set after construction, like `from_pretrained(path, field=value)` overrides) when a
model is built from the configuration, before any layer is."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_mom import ModuleFormerForCausalLM, MoEUTConfig, MoEUTForCausalLM, MoMForCausalLM

from . import test_moduleformer, test_moeut, test_mom

ARCHS = {
    "mom": (test_mom.tiny_config, MoMForCausalLM, "layer_norm_epsilon"),
    "moeut": (test_moeut.tiny_config, MoEUTForCausalLM, "layer_norm_eps"),
    "moduleformer": (test_moduleformer.tiny_config, ModuleFormerForCausalLM, "layer_norm_epsilon"),
}


def common_bad_values(epsilon: str):
    return [
        ({"hidden_act": "gelu_nwe"}, "hidden_act='gelu_nwe' is not a transformers activation"),
        ({epsilon: 0.0}, f"{epsilon}=0.0 must be a finite number > 0"),
        ({epsilon: math.inf}, f"{epsilon}=inf must be a finite number > 0"),  # gave constant logits
        ({"initializer_range": -0.1}, "initializer_range=-0.1 must be a finite number > 0"),
        ({"initializer_range": 0.0}, "initializer_range=0.0 must be a finite number > 0"),  # became 0.02 in places
        ({"initializer_range": math.inf}, "initializer_range=inf must be a finite number > 0"),  # gave NaN logits
        ({"router_aux_loss_coef": math.inf}, "router_aux_loss_coef=inf must be a finite number >= 0"),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_common_fields_are_checked_at_construction(arch):
    make_config, _, epsilon = ARCHS[arch]
    for overrides, message in common_bad_values(epsilon):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            make_config(**overrides)


@pytest.mark.parametrize("arch", ARCHS)
def test_overrides_after_construction_are_checked_before_the_model_is_built(arch, tmp_path):
    """Keyword overrides of `from_pretrained` are set on the loaded configuration as attributes: checked once set,
    by the configuration's `from_pretrained` as by the model's."""
    make_config, model_class, epsilon = ARCHS[arch]
    model_class(make_config()).save_pretrained(tmp_path)
    for overrides, message in common_bad_values(epsilon):
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(tmp_path, **overrides)
        with pytest.raises(ValueError, match=message):
            type(make_config()).from_pretrained(tmp_path, **overrides)
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
    with pytest.raises(ValueError, match="router_aux_loss_coef=-1.0 must be a finite number >= 0"):
        test_mom.tiny_config(router_aux_loss_coef=-1.0)
    for temperature in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=f"router_temperature={temperature} must be a finite number > 0"):
            test_mom.tiny_config(router_temperature=temperature)


def test_moeut_partial_rope_that_rotates_nothing():
    """0.05 of a 10-wide head rounds down to 0 rotated dims: no positional information at all, silently."""
    with pytest.raises(ValueError, match="partial_rotary_factor=0.05 rotates no dims"):
        test_moeut.tiny_config(partial_rotary_factor=0.05)
    assert test_moeut.tiny_config(partial_rotary_factor=0.0).num_rotary_dims == 0  # explicitly no RoPE: allowed
    with pytest.raises(ValueError, match="rope_theta=inf must be a finite number > 0"):
        test_moeut.tiny_config(rope_theta=math.inf)


@pytest.mark.parametrize("arch", ARCHS)
def test_saving_a_config_changed_into_a_bad_one_fails_before_writing_anything(arch, tmp_path):
    """transformers copies the code files before it validates the configuration (when writing config.json): a
    directory of code files without a configuration was left behind, by the config's and the model's save."""
    make_config, model_class, _ = ARCHS[arch]
    config = make_config()
    model = model_class(config)
    config.router_aux_loss_coef = -1
    for saved in (config, model):
        with pytest.raises(ValueError, match="router_aux_loss_coef=-1"):
            saved.save_pretrained(tmp_path / type(saved).__name__)
        assert not (tmp_path / type(saved).__name__).exists()


DERIVED = {"mom": ("intermediate_size", "num_hidden_layers"), "moeut": ("initializer_range",),
           "moduleformer": ("attention_hidden_size",)}


@pytest.mark.parametrize("arch", ARCHS)
def test_fields_derived_from_none_need_a_value_after_construction(arch, tmp_path):
    """None derives a default only when the configuration is built; set later it crashed at model build with a
    TypeError that named no field."""
    make_config, model_class, _ = ARCHS[arch]
    model_class(make_config()).save_pretrained(tmp_path)
    for name in DERIVED[arch]:
        config = make_config()
        setattr(config, name, None)
        with pytest.raises(ValueError, match=f"{name}=None: its default is derived only when the configuration"):
            model_class(config)
        with pytest.raises(ValueError, match=f"{name}=None"):
            AutoModelForCausalLM.from_pretrained(tmp_path, **{name: None})


def test_read_only_derived_fields_say_what_to_set():
    """They raised an AttributeError (property without setter) after transformers logged the whole config."""
    with pytest.raises(ValueError, match=r"head_dim=64: ModuleFormerConfig derives it as attention_hidden_size // "):
        test_moduleformer.tiny_config(head_dim=64)
    with pytest.raises(ValueError, match="num_rotary_dims=4: MoEUTConfig derives it as partial_rotary_factor"):
        test_moeut.tiny_config(num_rotary_dims=4)


def test_moduleformer_per_layer_counts_are_named():
    """A bad entry blamed num_*_experts_per_tok with an impossible range ("1..-1"), or named no field."""
    for name, value, message in (("attention_experts_per_layer", -1, ">= 1"), ("mlp_experts_per_layer", 0, ">= 1"),
                                 ("pruned_mlp_experts_per_layer", -3, ">= 0")):
        layers = test_moduleformer.tiny_config().num_hidden_layers
        counts = [4] * (layers - 1) + [value] if not name.startswith("pruned") else [0] * (layers - 1) + [value]
        with pytest.raises(ValueError, match=rf"{name}\[{layers - 1}\]={value} must be {message}"):
            test_moduleformer.tiny_config(**{name: counts})


@pytest.mark.parametrize(
    "alias, value, field",
    [("n_layer", 2.5, "num_hidden_layers"), ("n_head", "2", "num_attention_heads"),
     ("gating_size", None, "router_hidden_size"), ("resid_pdrop", "0.1", "resid_dropout")],
)  # fmt: skip
def test_moduleformer_official_keys_are_type_checked_as_their_fields(alias, value, field, tmp_path):
    """Values given under the official MoLM names (`attribute_map`) skipped `@strict`'s type checks: `n_layer=2.5`
    was accepted and failed later inside `range`, `n_head="2"` with a comparison error that named no field."""
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}'"):
        test_moduleformer.tiny_config(**{alias: value})
    test_moduleformer.tiny_config().save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}'"):
        AutoConfig.from_pretrained(tmp_path, **{alias: value})
    assert test_moduleformer.tiny_config(n_layer=3).num_hidden_layers == 3


def test_moeut_presets_refuse_unknown_overrides_and_names():
    """A misspelled override was ignored (the preset's value kept, silently)."""
    with pytest.raises(ValueError, match=r"\['num_expert'\] are neither fields nor attributes of MoEUTConfig"):
        MoEUTConfig.from_preset("moeut-44m", num_expert=64)
    with pytest.raises(ValueError, match=r"Unknown MoEUT preset \['moeut-44m'\]; allowed: \['moeut-44m'"):
        MoEUTConfig.from_preset(["moeut-44m"])
    assert MoEUTConfig.from_preset("moeut-44m", num_experts=64).num_experts == 64


@pytest.mark.parametrize("arch", ARCHS)
def test_a_padding_mask_of_the_wrong_shape_is_refused_by_shape(arch):
    """A mask one column short used to fail inside a broadcast (MoM, MoEUT)."""
    make_config, model_class, _ = ARCHS[arch]
    model = model_class(make_config()).eval()
    ids = torch.randint(3, 50, (2, 5))
    for mask in (torch.ones(2, 4), torch.ones(3, 5)):
        with pytest.raises(ValueError, match=rf"attention_mask has shape \({mask.shape[0]}, {mask.shape[1]}\)"):
            model(ids, attention_mask=mask)
