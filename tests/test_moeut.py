"""MoEUT model behaviour: config and presets, exact cached decoding, sigma-MoE and SwitchHead against naive per-expert
references, the entropy regulariser, heads, Trainer contract, gradient checkpointing, save/load and remote code.

Tolerances: fp32 on CPU. Cached and uncached forwards (and the dispatch and the naive loops) run the same maths on
different tensor shapes and in different summation orders, so results differ by float rounding (~1e-6 on outputs of
order 1); we allow 1e-5. Token sequences must be identical.
"""

import math
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from modeling_mom import (
    MoEUTConfig,
    MoEUTForCausalLM,
    MoEUTForQuestionAnswering,
    MoEUTForSequenceClassification,
    MoEUTForTokenClassification,
    MoEUTModel,
)
from modeling_mom.modeling_moeut import (
    MoEUTAttention,
    MoEUTExperts,
    MoEUTFeedForward,
    MoEUTRotaryEmbedding,
    MoEUTRouter,
    moeut_aux_loss,
)
from modeling_mom.moe_dispatch import plan_dispatch
from modeling_mom.routing_losses import sequence_entropy_loss
from modeling_mom.shared_modeling import CACHE_FIELD

from .cache_contract import assert_caches_generate_what_the_dynamic_cache_does
from .remote_contract import assert_remote_code_load_matches
from .trainer_contract import assert_accumulation_equals_big_batch

VOCAB = 61
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config(**overrides) -> MoEUTConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_unique_layers=2,
        num_attention_heads=2,
        head_dim=10,
        num_attention_experts=3,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        pad_token_id=0,
        bos_token_id=1,
    )
    kwargs.update(overrides)
    return MoEUTConfig(**kwargs)


def left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


VARIANTS = [
    dict(),
    dict(num_attention_experts=1),
    dict(norm_scheme="pre", num_unique_layers=1),
    dict(norm_scheme="post", head_dim=9, partial_rotary_factor=1.0),  # odd head_dim: 9 rotated dims -> 8
    dict(partial_rotary_factor=0.0, num_hidden_layers=6, num_unique_layers=3),
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}, max_position_embeddings=6),  # decodes past 6
]


def variant_id(variant):
    return "-".join(f"{k}={v}" for k, v in variant.items()) or "default"


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_hidden_layers=5), "num_hidden_layers"),
        (dict(num_experts_per_tok=7), "num_experts_per_tok"),
        (dict(num_attention_experts_per_tok=4), "num_attention_experts_per_tok"),
        (dict(norm_scheme="sandwich"), "norm_scheme"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(expert_dropout=1.0), "expert_dropout"),
        (dict(head_dim=0), "head_dim"),
        (dict(rope_theta=0), "rope_theta"),
        (dict(rope_parameters={"rope_type": "ntk"}), "rope_type='ntk'"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}, partial_rotary_factor=0.0),
         "partial_rotary_factor=0.0 rotates 0 dims"),
        (dict(initializer_range=-1.0), "initializer_range"),
        # values inside rope_parameters escape @strict's type checks; transformers only logs a bad factor
        (dict(partial_rotary_factor="0.5"), "partial_rotary_factor='0.5'; allowed: a number"),
        (dict(rope_theta="x"), "rope_theta='x' must be a finite number"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 0.0}), "factor=0.0 .* a finite number > 0"),  # NaN
        (dict(rope_parameters={"rope_type": "yarn", "factor": math.nan}), "factor=nan"),
        (dict(rope_parameters={"rope_type": "linear"}), "Missing required keys .* {'factor'}"),  # was a KeyError
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_rotated_width_is_rounded_down_to_even():
    """The official clean code crashes on the 44M model's head_dim=82 (41 rotated dims); the training code uses 40."""
    assert MoEUTConfig.from_preset("moeut-44m").num_rotary_dims == 40
    assert tiny_config(head_dim=9, partial_rotary_factor=1.0).num_rotary_dims == 8


def test_the_smallest_rotary_fraction_the_error_names_is_accepted():
    """2 / head_dim rotates 2 dims: float rounding made it (and the error's printed minimum) rotate none."""
    for head_dim in range(2, 257):
        assert tiny_config(head_dim=head_dim, partial_rotary_factor=2 / head_dim).num_rotary_dims == 2
    with pytest.raises(ValueError) as error:
        tiny_config(head_dim=7, partial_rotary_factor=0.2)
    minimum = float(re.search(r"at least 2 / head_dim = ([0-9.]+[0-9])", str(error.value)).group(1))
    assert tiny_config(head_dim=7, partial_rotary_factor=minimum).num_rotary_dims == 2


# Parameter counts at vocabulary 8000 (moeut.md section 3.1, computed from the official sweeps).
PAPER_PARAMETERS = {
    "moeut-44m": 44.35e6,
    "moeut-126m": 125.67e6,
    "moeut-244m": 243.33e6,
    "moeut-319m": 318.11e6,
    "moeut-728m": 727.42e6,
    "moeut-1040m": 1040.32e6,
}


def test_presets_match_the_paper_parameter_counts():
    assert MoEUTConfig.preset_names() == list(PAPER_PARAMETERS)
    for name, expected in PAPER_PARAMETERS.items():
        config = MoEUTConfig.from_preset(name)
        assert config.vocab_size == 8000
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = MoEUTForCausalLM(config)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - expected) / expected < 0.005, (name, count)
    assert MoEUTConfig.from_preset("moeut-728m").hidden_size == 1280  # not the official profile's 1024
    assert MoEUTConfig.from_preset("moeut-44m", vocab_size=50257).vocab_size == 50257
    assert MoEUTConfig.from_preset("moeut-44m", num_labels=3).num_labels == 3  # a config attribute, not a field
    with pytest.raises(ValueError, match="num_expert_per_tok"):
        MoEUTConfig.from_preset("moeut-44m", num_expert_per_tok=4)
    with pytest.raises(ValueError, match="moeut-45m"):
        MoEUTConfig.from_preset("moeut-45m")


def test_layers_are_shared_and_unrolled():
    config = tiny_config(num_hidden_layers=6, num_unique_layers=2)
    model = MoEUTModel(config).eval()
    assert len(model.layers) == 2
    calls = []
    for index, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    out = model(torch.randint(2, VOCAB, (2, 5)), output_hidden_states=True, use_cache=True)
    assert calls == [0, 1, 0, 1, 0, 1]  # A, B, A, B, A, B
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(getattr(out, CACHE_FIELD).layers) == config.num_hidden_layers



@pytest.mark.parametrize("scheme", ["peri", "pre", "post"])
def test_layer_places_its_layernorms_by_norm_scheme(scheme):
    """moeut.md 1.2: peri-LN feeds the normalised residual to Q, K and the routers, but the raw residual to V and to
    the experts' up-projection; pre-LN normalises every input; post-LN normalises after each residual sum."""
    torch.manual_seed(0)
    model = MoEUTModel(tiny_config(norm_scheme=scheme)).eval()
    layer = model.layers[0]
    ln1, ln2, attention, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.attention, layer.mlp
    x = torch.randn(1, 6, 32)
    position_embeddings = model.rotary_emb(x, torch.arange(6)[None])
    mask = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        if scheme == "post":
            h = ln1(x + attention(x, x, position_embeddings, mask)[0])
            expected = ln2(h + mlp(h, h))
        else:
            h = x + attention(ln1(x), x if scheme == "peri" else ln1(x), position_embeddings, mask)[0]
            expected = h + mlp(h if scheme == "peri" else ln2(h), ln2(h))
        torch.testing.assert_close(layer(x, position_embeddings, attention_mask=mask), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_incremental_forward_equals_full_forward(variant):
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(**variant)).eval()
    ids, mask = left_padded_batch()
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    steps, cache = [out.logits], getattr(out, CACHE_FIELD)
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = getattr(out, CACHE_FIELD)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], **TOL)


def test_incremental_forward_without_attention_mask():
    """Positions come from the cache length (the official code's query RoPE offset was always 0)."""
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(partial_rotary_factor=1.0)).eval()
    ids = torch.randint(2, VOCAB, (2, 8))
    full = model(ids).logits
    out = model(ids[:, :3], use_cache=True)
    steps, cache = [out.logits], getattr(out, CACHE_FIELD)
    for t in range(3, 8):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = getattr(out, CACHE_FIELD)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=variant_id)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_cache_equals_without(variant, num_beams):
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(**variant)).eval()
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, num_beams=num_beams)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))



@pytest.mark.parametrize("variant", VARIANTS[:2], ids=variant_id)
def test_static_and_quantized_caches_generate_what_the_dynamic_cache_does(variant):
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(**variant)).eval()
    assert_caches_generate_what_the_dynamic_cache_does(model, *left_padded_batch(), pad_token_id=0)

def test_left_padding_gives_no_nan_and_does_not_change_a_rows_continuation():
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(output_router_logits=True))
    ids, mask = left_padded_batch()
    out = model.train()(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    row = ids[2:3, 5:]
    alone = model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[2, -6:], alone[0, -6:])


# ------------------------------------------------------------------------- experts vs naive references


def naive_sigma_moe(ffn: MoEUTFeedForward, x: torch.Tensor, router_input: torch.Tensor) -> torch.Tensor:
    """Token by token: y = sum over the top-k of sigmoid(score) * (relu(x @ up[e] + b_up[e]) @ down[e] + b_down[e])."""
    scores = torch.sigmoid(router_input @ ffn.router.weight.T)
    experts, out = ffn.experts, torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in scores[t].topk(ffn.router.num_selected).indices.tolist():
            up_bias, down_bias = (experts.up_proj_bias[e], experts.down_proj_bias[e]) if experts.has_bias else (0, 0)
            hidden = torch.relu(x[t] @ experts.up_proj[e] + up_bias)
            out[t] += scores[t, e] * (hidden @ experts.down_proj[e] + down_bias)
    return out


@pytest.mark.parametrize("mlp_bias", [False, True], ids=["no-bias", "bias"])
def test_sigma_moe_equals_naive_reference_for_every_experts_implementation(mlp_bias):
    torch.manual_seed(0)
    config = tiny_config(num_experts=7, num_experts_per_tok=3, mlp_bias=mlp_bias)
    model = MoEUTForCausalLM(config).eval()
    ffn = model.model.layers[0].mlp
    if mlp_bias:
        torch.nn.init.normal_(ffn.experts.up_proj_bias)
        torch.nn.init.normal_(ffn.experts.down_proj_bias)
    x, router_input = torch.randn(11, 32), torch.randn(11, 32)
    expected = naive_sigma_moe(ffn, x, router_input)
    assert model.config._experts_implementation == "eager"  # the shared dispatch is the default
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        torch.testing.assert_close(ffn(x, router_input), expected, **TOL)
    standalone = MoEUTExperts(config)  # the experts know their biases without the feed-forward layer's help
    standalone.load_state_dict(ffn.experts.state_dict())
    _, gates, selected = ffn.router(router_input)
    torch.testing.assert_close(standalone(x, selected, gates), expected, **TOL)


def naive_rotary(x: torch.Tensor, positions: torch.Tensor, rotary: int, theta: float) -> torch.Tensor:
    """`[T, dh]`: dims i and i + rotary/2 (i < rotary/2) rotated by position * theta^(-2i/rotary)."""
    out = x.clone()
    half = rotary // 2
    for i in range(half):
        angle = positions.float() * theta ** (-2 * i / rotary)
        a, b = x[:, i], x[:, i + half]
        out[:, i] = a * angle.cos() - b * angle.sin()
        out[:, i + half] = b * angle.cos() + a * angle.sin()
    return out


def naive_switchhead(attn: MoEUTAttention, config: MoEUTConfig, q_in: torch.Tensor, v_in: torch.Tensor):
    """One sequence `[T, d]`, loops over heads, tokens and chosen experts; causal softmax attention."""
    heads, dh, experts, k = config.num_attention_heads, config.head_dim, config.num_attention_experts, 2
    seq = q_in.shape[0]
    positions = torch.arange(seq)
    v_scores = torch.sigmoid(q_in @ attn.v_router.weight.T).view(seq, heads, experts)
    o_scores = torch.sigmoid(q_in @ attn.o_router.weight.T).view(seq, heads, experts)
    causal = torch.ones(seq, seq).tril().bool()
    out = torch.zeros(seq, config.hidden_size)
    for h in range(heads):
        head = slice(h * dh, (h + 1) * dh)
        q = naive_rotary((q_in @ attn.q_proj.weight.T)[:, head], positions, config.num_rotary_dims, config.rope_theta)
        key = naive_rotary((q_in @ attn.k_proj.weight.T)[:, head], positions, config.num_rotary_dims, config.rope_theta)
        v = torch.zeros(seq, dh)
        for t in range(seq):
            for e in v_scores[t, h].topk(k).indices.tolist():
                v[t] += v_scores[t, h, e] * (v_in[t] @ attn.v_experts[h * experts + e])
        weights = (q @ key.T / math.sqrt(dh)).masked_fill(~causal, float("-inf")).softmax(-1)
        result = weights @ v
        for t in range(seq):
            for e in o_scores[t, h].topk(k).indices.tolist():
                out[t] += o_scores[t, h, e] * (result[t] @ attn.o_experts[h * experts + e])
    return out


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_switchhead_equals_naive_reference(attn_implementation):
    torch.manual_seed(0)
    config = tiny_config(num_attention_heads=3, num_attention_experts=4, partial_rotary_factor=0.6)
    model = MoEUTModel(config).eval()
    model.set_attn_implementation(attn_implementation)
    attn = model.layers[0].attention
    q_in, v_in = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    position_embeddings = model.rotary_emb(q_in, torch.arange(7)[None])
    causal_mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    out, _ = attn(q_in, v_in, position_embeddings, attention_mask=causal_mask)
    torch.testing.assert_close(out[0], naive_switchhead(attn, config, q_in[0], v_in[0]), **TOL)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_decoding_without_autograd_matches_the_sorted_dispatch(bias):
    """Without autograd and with at most one choice per expert (decoding), the sigma-MoE and SwitchHead's V and O
    experts run as unsorted embedding bags (`bag_mixture`: no plan, no scatter); the logits equal the sorted
    dispatch's (the same products summed in another order: 1e-5). With expert biases, the FFN and V keep the sorted
    dispatch."""
    torch.manual_seed(0)
    config = tiny_config(num_attention_heads=3, num_attention_experts=4, num_experts=7, num_experts_per_tok=3,
                         mlp_bias=bias, attention_bias=bias)  # fmt: skip
    model = MoEUTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("_bias"):
                param.normal_()
    ids = torch.randint(1, VOCAB, (1, 2))  # at most one choice per expert: 6 of 7 FFN experts, 12 of 12 V and O
    sorted_logits = model(ids).logits.detach()  # autograd on: the sorted dispatch
    with torch.no_grad(), mock.patch("modeling_mom.modeling_moeut.plan_dispatch", wraps=plan_dispatch) as spy:
        bag_logits = model(ids).logits
    assert (spy.call_count > 0) == bias
    torch.testing.assert_close(bag_logits, sorted_logits, atol=1e-5, rtol=1e-5)


def test_router_picks_by_logit_where_the_fp32_sigmoid_ties():
    """Sigmoid scores of logits above ~17 are all 1.0 in fp32: the top-k is taken on the logits (the same order,
    without the ties, as the official training code does), and the gates are the sigmoid of the chosen logits."""
    router = MoEUTRouter(hidden_size=2, num_groups=1, num_choices=3, num_selected=1, expert_dropout=0.0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[20.0, 0.0], [30.0, 0.0], [25.0, 0.0]]))
    _, gates, selected = router(torch.tensor([[1.0, 0.0]]))
    assert torch.sigmoid(torch.tensor([20.0, 30.0])).unique().tolist() == [1.0]  # tied in fp32
    assert selected.tolist() == [[1]] and gates.tolist() == [[1.0]]


def test_single_attention_expert_is_a_sigmoid_output_gate():
    torch.manual_seed(0)
    config = tiny_config(num_attention_experts=1, partial_rotary_factor=0.0)
    model = MoEUTModel(config).eval()
    attn = model.layers[0].attention
    q_in, v_in = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    out, _ = attn(q_in, v_in, model.rotary_emb(q_in, torch.arange(5)[None]), attention_mask=None)
    heads, dh = config.num_attention_heads, config.head_dim
    projections = ((attn.q_proj, q_in[0]), (attn.k_proj, q_in[0]), (attn.v_proj, v_in[0]))
    q, k, v = (proj(x).view(5, heads, dh).transpose(0, 1) for proj, x in projections)
    result = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)  # [T, H, dh]
    gate = torch.sigmoid(q_in[0] @ attn.o_gate.T)[..., None]
    torch.testing.assert_close(out[0], attn.o_proj((result * gate).reshape(5, -1)), **TOL)


# ----------------------------------------------------------------------------------- the regulariser


def test_sequence_entropy_loss_by_hand():
    # batch 2, seq 2, two calls (repeats), 3 choices; the second token of sequence 1 is padding
    calls = [torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]]),
             torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 0.0, 0.0]])]
    probs = [c.softmax(-1) for c in calls]

    def neg_entropy(p):
        return (p * p.log()).sum()

    seq0 = (probs[0][0] + probs[0][1] + probs[1][0] + probs[1][1]) / 4
    seq1_all = (probs[0][2] + probs[0][3] + probs[1][2] + probs[1][3]) / 4
    torch.testing.assert_close(sequence_entropy_loss(calls, 2), (neg_entropy(seq0) + neg_entropy(seq1_all)) / 2)
    seq1_real = (probs[0][2] + probs[1][2]) / 2
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(sequence_entropy_loss(calls, 2, mask), (neg_entropy(seq0) + neg_entropy(seq1_real)) / 2)
    # uniform routing reaches the minimum -log C; groups (heads) are averaged
    torch.testing.assert_close(sequence_entropy_loss([torch.zeros(4, 5, 3)], 2), torch.tensor(-math.log(3)))


def test_aux_loss_is_the_papers_weighted_sum_over_shared_layers():
    torch.manual_seed(0)
    config = tiny_config(
        num_hidden_layers=6, num_unique_layers=2, router_aux_loss_coef=0.01, attention_router_aux_loss_coef=0.001
    )
    model = MoEUTForCausalLM(config).eval()
    ids, mask = left_padded_batch()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    logits = out.router_logits  # per step: V router [N, H, E_A], O router [N, H, E_A], FFN router [N, E]
    assert len(logits) == 3 * config.num_hidden_layers
    assert logits[0].shape == (ids.numel(), 2, 3) and logits[2].shape == (ids.numel(), 6)
    expected = 0.0
    for layer in range(2):
        steps = range(layer, 6, 2)  # the repeats of shared layer `layer`
        for slot, coef in ((0, 0.001), (1, 0.001), (2, 0.01)):
            expected += coef * sequence_entropy_loss([logits[3 * s + slot] for s in steps], 3, mask)
    torch.testing.assert_close(out.aux_loss, expected)
    plain = model(ids, attention_mask=mask, labels=ids, output_router_logits=False)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss, atol=0, rtol=0)  # evaluation: the task loss alone
    trained = model.train()(ids, attention_mask=mask, labels=ids)  # training: the regulariser joins, unasked
    torch.testing.assert_close(trained.loss, plain.loss + out.aux_loss)


def test_single_attention_expert_has_only_ffn_routers():
    config = tiny_config(num_attention_experts=1)
    out = MoEUTForCausalLM(config)(torch.randint(2, VOCAB, (2, 5)), output_router_logits=True)
    assert len(out.router_logits) == config.num_hidden_layers
    expected = sum(0.01 * sequence_entropy_loss(list(out.router_logits[g::2]), 2) for g in range(2))
    torch.testing.assert_close(out.aux_loss, expected)


# --------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = tiny_config(output_router_logits=True)
    ids = torch.randint(2, VOCAB, (2, 8))
    reference = MoEUTForCausalLM(config).state_dict()
    grads = []
    for checkpointing in (False, True):
        model = MoEUTForCausalLM(config).train()
        model.load_state_dict(reference)
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("router" in name for name in grads[0])  # the regulariser reaches the routers
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_trainer_gradient_accumulation_equals_big_batch(tmp_path):
    """Regulariser off (random rows); with it on, see test_trainer_contract."""
    torch.manual_seed(0)
    ids = torch.randint(2, VOCAB, (8, 10))
    assert_accumulation_equals_big_batch(lambda: MoEUTForCausalLM(tiny_config()), ids, tmp_path)


def test_expert_dropout_only_in_training():
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(expert_dropout=0.5, attention_expert_dropout=0.5))
    ids = torch.randint(2, VOCAB, (2, 6))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_expert_dropout_drops_each_choice_at_its_rate_and_gates_stay_undropped():
    """Training drops each (token, expert) candidate with probability `expert_dropout` before the top-k, and the gate
    of what is chosen is the sigmoid of its own logit. The best of three choices (logits 5, 2, -1) is picked unless
    it is dropped: probability 1 - 0.2 = 0.8 (plus at most 0.2^3 = 0.008 when all three are dropped). Over 20000
    tokens the binomial standard deviation is 0.003, so a tolerance of 0.02 is ~7 of them."""
    torch.manual_seed(0)
    router = MoEUTRouter(hidden_size=2, num_groups=1, num_choices=3, num_selected=1, expert_dropout=0.2).train()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[5.0, 0.0], [2.0, 0.0], [-1.0, 0.0]]))
    _, gates, selected = router(torch.tensor([[1.0, 0.0]]).expand(20000, 2))
    assert abs((selected == 0).float().mean().item() - 0.8) < 0.02
    assert (selected == 1).any() and (selected == 2).any()
    torch.testing.assert_close(gates, torch.tensor([5.0, 2.0, -1.0]).sigmoid()[selected])


def test_dynamic_ntk_needs_four_rotated_dims():
    """Dynamic NTK scaling divides by (rotated dims - 2): two rotated dims are refused by name."""
    with pytest.raises(ValueError, match="rotates 2 dims of each head; allowed: at least 4"):
        MoEUTConfig(hidden_size=32, num_attention_heads=4, head_dim=8, partial_rotary_factor=0.25,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})  # fmt: skip


def test_official_initialisation():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, num_experts=40, moe_intermediate_size=16)
    model = MoEUTForCausalLM(config)
    scale = math.sqrt(2 / config.num_hidden_layers)
    layer = model.model.layers[0]
    stds = {
        "embedding": (model.model.embed_tokens.weight, 1 / math.sqrt(64)),
        "up_proj": (layer.mlp.experts.up_proj, scale / math.sqrt(64)),
        "down_proj": (layer.mlp.experts.down_proj, scale / math.sqrt(40 * 16)),
        "ffn router": (layer.mlp.router.weight, scale / math.sqrt(64)),
        "q_proj": (layer.attention.q_proj.weight, scale / math.sqrt(64)),
        "o_experts": (layer.attention.o_experts, scale / math.sqrt(2 * 10)),
    }
    for name, (weight, std) in stds.items():
        assert abs(weight.std().item() / std - 1) < 0.1, name
    norms = layer.mlp.router.weight.norm(dim=1)
    torch.testing.assert_close(norms, norms.mean().expand_as(norms))  # equal row norms (renorm_keep_std)
    assert model.lm_head.bias is not None and model.lm_head.weight.abs().max() <= 1 / math.sqrt(64)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for head in (MoEUTForSequenceClassification(config).score, MoEUTForQuestionAnswering(config).qa_outputs,
                 MoEUTForTokenClassification(config).score):  # the other heads: PyTorch's default too
        assert head.weight.abs().max() <= 1 / math.sqrt(64) and head.weight.std() > 0.8 / math.sqrt(3 * 64)


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_pools_last_real_token_and_adds_the_regulariser():
    torch.manual_seed(0)
    model = MoEUTForSequenceClassification(tiny_config(num_labels=3)).eval()
    row = torch.randint(2, VOCAB, (1, 6))
    alone = model(row).logits
    ones, zeros = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    pad = zeros
    right = model(torch.cat([row, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits
    left = model(torch.cat([pad, row], 1), attention_mask=torch.cat([zeros, ones], 1)).logits
    torch.testing.assert_close(right, alone, **TOL)
    torch.testing.assert_close(left, alone, **TOL)
    labels = torch.tensor([2])
    plain = model(row, labels=labels)
    torch.testing.assert_close(plain.loss, F.cross_entropy(alone, labels))
    regularised = model.train()(row, labels=labels)  # in training, the regulariser joins unasked
    with torch.no_grad():
        causal_lm_router_logits = model.model(row, output_router_logits=True).router_logits
    aux = moeut_aux_loss(model.config, causal_lm_router_logits, 1, None)
    torch.testing.assert_close(regularised.loss, plain.loss + aux)


# ----------------------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(partial_rotary_factor=1.0)).eval()
    ids, mask = left_padded_batch()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoEUTForCausalLM)
    assert loaded.config.to_dict()["num_unique_layers"] == 2
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_rope_keeps_fp32_frequencies_in_a_half_precision_model():
    """`model.to(bf16)` casts buffers: RoPE frequencies kept in one would be rounded (phase errors of ~0.5 rad at
    the 244M preset's 1024 positions); they are computed in fp32 at each call instead."""
    config = MoEUTConfig.from_preset("moeut-244m", num_hidden_layers=2)
    rotary = MoEUTRotaryEmbedding(config)
    positions = torch.arange(1024)[None]
    cos32, sin32 = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos16, sin16 = rotary.to(torch.bfloat16)(torch.zeros(1, dtype=torch.bfloat16), positions)
    torch.testing.assert_close(cos16.float(), cos32, atol=8e-3, rtol=0)  # bf16 rounding of values in [-1, 1] only
    torch.testing.assert_close(sin16.float(), sin32, atol=8e-3, rtol=0)


ROPE_SCALINGS = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0},
    "llama3": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"long_factor": [1.0, 2.0, 4.0, 8.0], "short_factor": [1.0] * 4},
}


@pytest.mark.parametrize("rope_type", ROPE_SCALINGS)
def test_rope_scaling_is_transformers_on_the_rotated_width(rope_type):
    """transformers' RoPE functions get the rotated width (9 dims of `head_dim=9` rounded down to 8), and the tables
    follow them: scaled frequencies, and yarn's and longrope's cos/sin scale."""
    rope_parameters = {"rope_type": rope_type, **ROPE_SCALINGS[rope_type]}
    config = tiny_config(head_dim=9, partial_rotary_factor=1.0, max_position_embeddings=16,
                         rope_parameters=rope_parameters)
    reference_config = tiny_config(head_dim=8, partial_rotary_factor=1.0, max_position_embeddings=16,
                                   rope_parameters=dict(rope_parameters))
    rotary = MoEUTRotaryEmbedding(config)
    for length in (10, 40):  # within and past the trained context (dynamic and longrope differ there)
        positions = torch.arange(length)[None]
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](reference_config, seq_len=torch.tensor(length))
        angles = positions[..., None].float() * inv_freq
        cos, sin = rotary(torch.zeros(1), positions)
        assert cos.shape == (1, length, 8)
        torch.testing.assert_close(cos, torch.cat([angles.cos(), angles.cos()], -1) * scale)
        torch.testing.assert_close(sin, torch.cat([angles.sin(), angles.sin()], -1) * scale)


def test_rope_scaling_changes_only_what_it_should():
    """Linear scaling changes every logit past the first token; dynamic NTK changes nothing for a sequence within
    the trained context and, past it, every position (its base grows with the sequence)."""
    torch.manual_seed(0)
    ids = torch.randint(2, VOCAB, (1, 12))
    plain = MoEUTForCausalLM(tiny_config(max_position_embeddings=8)).eval()
    scaled = {}
    for rope_type in ("linear", "dynamic"):
        config = tiny_config(max_position_embeddings=8, rope_parameters={"rope_type": rope_type, "factor": 4.0})
        scaled[rope_type] = MoEUTForCausalLM(config).eval()
        scaled[rope_type].load_state_dict(plain.state_dict())
    logits = plain(ids).logits
    assert not torch.allclose(scaled["linear"](ids).logits[:, 1:], logits[:, 1:], atol=1e-3)
    torch.testing.assert_close(scaled["dynamic"](ids[:, :8]).logits, plain(ids[:, :8]).logits)
    assert not torch.allclose(scaled["dynamic"](ids).logits[:, 1:], logits[:, 1:], atol=1e-3)


def test_rope_fields_of_earlier_configurations_load_into_rope_parameters(tmp_path):
    """Configurations saved before `rope_parameters` hold `rope_theta` and `partial_rotary_factor` as fields."""
    config = tiny_config(rope_theta=500.0, partial_rotary_factor=0.6)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.6}
    saved = config.to_dict()
    saved.update(saved.pop("rope_parameters"))
    del saved["rope_type"]
    loaded = MoEUTConfig.from_dict(saved)
    assert loaded.rope_parameters == config.rope_parameters and loaded.num_rotary_dims == 6
    loaded.rope_theta = 800.0  # attributes as before
    assert loaded.rope_parameters["rope_theta"] == 800.0


def test_rope_parameters_set_as_an_attribute_are_checked_and_completed():
    """A dict set after construction is not standardised by transformers: the model fills in the defaults."""
    config = tiny_config()
    config.rope_parameters = {"factor": 2.0, "rope_type": "linear"}
    rotary = MoEUTForCausalLM(config).model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, MoEUTRotaryEmbedding(tiny_config()).inv_freq / 2)
    config.rope_parameters = None
    with pytest.raises(ValueError, match=r"rope_parameters=None; allowed: a dict"):
        MoEUTForCausalLM(config)


def test_remote_code_load_without_the_package(tmp_path):
    """With a RoPE scaling past the trained context, so that the copied configuration file's `rope_parameters` count."""
    torch.manual_seed(0)
    model = MoEUTForCausalLM(tiny_config(rope_parameters={"rope_type": "yarn", "factor": 4.0},
                                         max_position_embeddings=6)).eval()
    assert_remote_code_load_matches(model, *left_padded_batch(), tmp_path)


def test_experts_implementations_agree_in_bfloat16():
    """Routing held fixed: the shared dispatch ("eager") and transformers' kernels against an fp32 computation on the
    same bf16 weights; within bf16 rounding (torch's default bf16 tolerance, rtol 1.6e-2)."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16)
    model = MoEUTForCausalLM(config)
    experts = model.model.layers[0].mlp.experts.to(torch.bfloat16)
    x = torch.randn(40, 64).to(torch.bfloat16)
    selected = torch.stack([torch.randperm(8)[:3] for _ in range(40)])
    gates = torch.rand(40, 3).to(torch.bfloat16)
    expected = torch.zeros(40, 64)
    for t in range(40):
        for j, e in enumerate(selected[t].tolist()):
            hidden = torch.relu(x[t].float() @ experts.up_proj[e].float())
            expected[t] += gates[t, j].float() * (hidden @ experts.down_proj[e].float())
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        out = experts(x, selected, gates)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=1.6e-2, atol=1.6e-2 * expected.abs().mean().item())


# ------------------------------------------------------------------------------------------ GPT-2 seeding


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=4, n_head=4, n_inner=256, bos_token_id=1,
                  eos_token_id=1, initializer_range=0.2)  # fmt: skip
    gpt2 = GPT2LMHeadModel(GPT2Config(**{**kwargs, **overrides})).eval()
    with torch.no_grad():  # GPT-2's init leaves biases at 0 and LayerNorms at (1, 0): perturb them so copies count
        for parameter in gpt2.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return gpt2


@pytest.mark.parametrize(
    "gpt2_overrides",
    [dict(), dict(activation_function="relu", n_layer=2), dict(tie_word_embeddings=False, n_layer=2)],
    ids=["gelu_new", "relu", "untied-head"],
)
def test_exact_conversion_equals_gpt2(gpt2_overrides, tmp_path):
    """Logits equal GPT-2's within fp32 rounding (1e-5 on logits of order 10: the same products, summed over 128-wide
    expert slices instead of one matmul); greedy continuations identical; the saved checkpoint reloads equal."""
    from conversion.gpt2_to_moeut import convert

    gpt2 = tiny_gpt2(**gpt2_overrides)
    model = convert(gpt2, exact=True, expert_size=64)
    model.save_pretrained(tmp_path)
    assert model.config.num_unique_layers == gpt2.config.n_layer and model.config.num_experts == 4
    ids = torch.randint(2, VOCAB, (3, 12))
    expected = gpt2(ids).logits
    assert expected.abs().max() > 1  # a non-trivial function
    torch.testing.assert_close(model(ids).logits, expected, **TOL)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), gpt2.generate(ids, **kwargs))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, expected, **TOL)


def test_exact_conversion_refuses_overrides_that_change_the_function():
    """A LayerNorm epsilon other than GPT-2's was accepted with exact=True, and the logits then differed by 0.4."""
    from conversion.gpt2_to_moeut import convert

    gpt2 = tiny_gpt2(n_layer=2)
    for field, value in (("layer_norm_eps", 1e-2), ("norm_scheme", "peri"), ("hidden_act", "relu")):
        with pytest.raises(ValueError, match=re.escape(f"; got {{'{field}': {value!r}}}")):
            convert(gpt2, exact=True, expert_size=64, **{field: value})
    assert convert(gpt2, exact=True, expert_size=64, layer_norm_eps=1e-5).config.layer_norm_eps == 1e-5


def test_shared_conversion_holds_every_gpt2_layer_as_experts():
    """G=2 of 4 GPT-2 layers: shared layer g's experts are the union of layers g and g+2 (upcycling, not identity)."""
    from conversion.gpt2_to_moeut import GATE_AT_ZERO, convert

    gpt2 = tiny_gpt2()
    model = convert(gpt2, num_unique_layers=2, expert_size=64)
    config = model.config
    assert (config.num_unique_layers, config.num_experts, config.num_experts_per_tok) == (2, 8, 4)
    assert config.num_attention_experts == 2
    layer, blocks = model.model.layers[1], (gpt2.transformer.h[1], gpt2.transformer.h[3])
    up = layer.mlp.experts.up_proj  # [8, d, 64]: experts 0-3 from block 1, 4-7 from block 3
    torch.testing.assert_close(up[5], blocks[1].mlp.c_fc.weight[:, 64:128])
    attention, experts, d, dh = layer.attention, layer.mlp.experts, 32, 8
    for r, block in enumerate(blocks):
        for h in range(4):  # value and output expert h * 2 + r: head h's slices of block r's projections
            value_columns = slice(2 * d + h * dh, 2 * d + (h + 1) * dh)
            torch.testing.assert_close(attention.v_experts[h * 2 + r], block.attn.c_attn.weight[:, value_columns])
            torch.testing.assert_close(attention.v_bias[h * 2 + r], block.attn.c_attn.bias[value_columns])
            torch.testing.assert_close(attention.o_experts[h * 2 + r], block.attn.c_proj.weight[h * dh : (h + 1) * dh])
        # each block's output bias, spread over its 4 experts and divided by the gate of a zero router
        spread_bias = experts.down_proj_bias[4 * r : 4 * r + 4].sum(0) * GATE_AT_ZERO
        torch.testing.assert_close(spread_bias, block.mlp.c_proj.bias)
        torch.testing.assert_close(experts.down_proj[4 * r + 1] * GATE_AT_ZERO, block.mlp.c_proj.weight[64:128])
    torch.testing.assert_close(attention.q_proj.weight, blocks[0].attn.c_attn.weight[:, :d].T)  # the group's first
    torch.testing.assert_close(attention.k_proj.weight, blocks[0].attn.c_attn.weight[:, d : 2 * d].T)
    # biases of the shared Q and K (a key bias shifts each query's scores alike, so no logits test can see it)
    torch.testing.assert_close(attention.q_proj.bias, blocks[0].attn.c_attn.bias[:d])
    torch.testing.assert_close(attention.k_proj.bias, blocks[0].attn.c_attn.bias[d : 2 * d])
    torch.testing.assert_close(attention.o_bias, (blocks[0].attn.c_proj.bias + blocks[1].attn.c_proj.bias) / 2)
    for ours, theirs in ((layer.input_layernorm, "ln_1"), (layer.post_attention_layernorm, "ln_2")):
        for name in ("weight", "bias"):  # the mean of the group's LayerNorms
            mean = (getattr(getattr(blocks[0], theirs), name) + getattr(getattr(blocks[1], theirs), name)) / 2
            torch.testing.assert_close(getattr(ours, name), mean)
    ids = torch.randint(2, VOCAB, (2, 9))
    assert torch.isfinite(model(ids, labels=ids).loss)
    model = convert(gpt2, num_unique_layers=2, expert_size=64, num_experts_per_tok=2, norm_scheme="peri")  # allowed
    assert (model.config.num_experts_per_tok, model.config.norm_scheme) == (2, "peri")
    for field, value in (("num_attention_experts", 3), ("mlp_bias", False), ("position_embedding_type", "rope")):
        with pytest.raises(ValueError, match=f"{field}.*would not fit the weights copied from GPT-2"):
            convert(gpt2, num_unique_layers=2, expert_size=64, **{field: value})


def test_conversion_cli(tmp_path, capsys):
    from conversion.gpt2_to_moeut import main

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    main(["--gpt2", str(tmp_path / "gpt2"), "--out", str(tmp_path / "moeut"), "--exact", "--expert-size", "64"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moeut")
    assert isinstance(model, MoEUTForCausalLM) and model.config.norm_scheme == "pre"
    with pytest.raises(SystemExit):
        main(["--gpt2", str(tmp_path / "gpt2"), "--out", str(tmp_path / "bad"), "--expert-size", "100"])
    assert "expert_size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
