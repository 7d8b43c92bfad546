"""MoM model behaviour: config validation, exact cached decoding, routing, heads, Trainer contract, remote code.

Tolerances: fp32 on CPU. Cached and uncached forwards run the same ops on different tensor shapes, so logits can
differ by float rounding (~1e-6); we allow 1e-5. Token sequences must be identical.
"""


from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_mom import MoMConfig, MoMForCausalLM, MoMForSequenceClassification, MoMModel
from modeling_mom.modeling_mom import (
    ModuleRoute,
    MoMAttention,
    MoMFeedForward,
    MoMModulePool,
    MoMPoolNorm,
    SignStraightThrough,
    grouped_linear,
    route_tokens,
)
from modeling_mom.routing_losses import switch_load_balancing_loss
from modeling_mom.shared_modeling import CACHE_FIELD

from .cache_contract import assert_caches_generate_what_the_dynamic_cache_does
from .remote_contract import assert_remote_code_load_matches
from .trainer_contract import assert_accumulation_equals_big_batch

VOCAB = 61


def tiny_config(**overrides) -> MoMConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_bottom_layers=1,
        num_top_layers=1,
        num_chunks=1,
        num_attention_modules=3,
        num_ffn_modules=3,
        num_rounds=3,
        num_modules_per_tok=1,
        router_hidden_size=16,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return MoMConfig(**kwargs)


def left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


ROUTINGS = [
    dict(router_type="mlp", num_modules_per_tok=1),
    dict(router_type="gru", num_modules_per_tok=2),
    dict(router_type="gru", num_modules_per_tok=1, num_rounds=5, enable_skip=True),
    dict(routing_mode="sequential"),
    dict(routing_mode="all_modules", router_weighting="probability", weighted_qkv=True),
    dict(num_modules_per_tok=2, router_weighting="score", sign_router_weights=True, weighted_qkv=True),
]


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_modules_per_tok=5), "num_modules_per_tok"),  # 3 modules + SKIP per pool
        (dict(routing_mode="sequential", num_rounds=4), "num_rounds"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(router_type="lstm"), "router_type"),
        (dict(router_weighting="softmax"), "router_weighting"),
        (dict(routing_mode="random"), "routing_mode"),
        (dict(router_temperature=0.0), "router_temperature"),
        (dict(router_weighting="score", router_temperature=0.2), "router_temperature=0.2 with router_weighting"),
        (dict(routing_mode="all_modules"), "router_weighting='straight_through' with routing_mode='all_modules'"),
        (dict(num_rounds=0), "num_rounds"),
        (dict(num_hidden_layers=7), "num_hidden_layers"),
        (dict(num_bottom_layers=0, num_top_layers=0, num_chunks=0), "no layers"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_a_pool_smaller_than_k_uses_all_its_choices():
    """One attention module with SKIP (2 choices), four FFN modules with SKIP (5), K=3: each pool routes
    top-min(K, choices), as the authors' code does, and its balancing loss counts the selections it made."""
    config = tiny_config(num_attention_modules=1, num_ffn_modules=4, num_modules_per_tok=3)
    model = MoMForCausalLM(config).eval()
    ids, mask = left_padded_batch()
    out = model(ids, attention_mask=mask, output_router_logits=True)
    attention_logits, ffn_logits = out.router_logits[0::2], out.router_logits[1::2]
    assert attention_logits[0].shape[-1] == 2 and ffn_logits[0].shape[-1] == 5
    expected = switch_load_balancing_loss(attention_logits, 2, mask) + switch_load_balancing_loss(ffn_logits, 3, mask)
    torch.testing.assert_close(out.aux_loss, expected)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(generated, uncached)


def test_a_single_choice_pool_has_no_router():
    """The MoE case (one attention module, no SKIP, several FFN modules): the attention pool has nothing to choose,
    so, as in the authors' code, it has no router; only the FFN routers' logits are returned and balanced."""
    config = tiny_config(num_attention_modules=1, num_ffn_modules=4, num_modules_per_tok=2, enable_skip=False)
    model = MoMForCausalLM(config).eval()
    chunk = model.model.layers[1]
    assert chunk.attention_router is None and chunk.mlp_router is not None
    ids, mask = left_padded_batch()
    out = model(ids, attention_mask=mask, output_router_logits=True)
    assert len(out.router_logits) == config.num_rounds and all(r.shape[-1] == 4 for r in out.router_logits)
    torch.testing.assert_close(out.aux_loss, switch_load_balancing_loss(out.router_logits, 2, mask))
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(generated, uncached)


def test_resid_dropout_spares_the_chunks_ffn_outputs():
    """As in the authors' code: `resid_dropout` acts on FFN outputs of plain blocks, not on those of chunks."""
    model = MoMModel(tiny_config(resid_dropout=0.5)).train()
    plain, chunk = model.layers[0].mlp, model.layers[1].mlp
    x = torch.randn(10, 32)
    trained = [pool(x, ModuleRoute(module=0)) for pool in (plain, chunk)]
    model.eval()
    evaluated = [pool(x, ModuleRoute(module=0)) for pool in (plain, chunk)]
    assert (trained[0] == 0).float().mean() > 0.3 and not torch.allclose(trained[0], evaluated[0])
    torch.testing.assert_close(trained[1], evaluated[1], atol=0, rtol=0)


def test_num_hidden_layers_is_the_unrolled_depth():
    config = tiny_config(num_bottom_layers=2, num_top_layers=1, num_chunks=2, num_rounds=3, use_anchor_layers=True)
    assert config.num_hidden_layers == 2 + 1 + 2 * (3 + 1)
    model = MoMModel(config).eval()
    out = model(torch.randint(1, VOCAB, (2, 5)), output_hidden_states=True, use_cache=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(getattr(out, CACHE_FIELD).layers) == config.num_hidden_layers


# ------------------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
def test_incremental_forward_equals_full_forward(routing):
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(**routing)).eval()
    ids, mask = left_padded_batch()
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    steps = [out.logits]
    cache = getattr(out, CACHE_FIELD)
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = getattr(out, CACHE_FIELD)
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_cache_equals_without(routing, num_beams):
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(**routing)).eval()
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=num_beams)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)



def test_static_and_quantized_caches_generate_what_the_dynamic_cache_does():
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(router_type="gru", num_modules_per_tok=2, enable_skip=True)).eval()
    assert_caches_generate_what_the_dynamic_cache_does(model, *left_padded_batch(), pad_token_id=0)

def test_left_padding_does_not_change_a_rows_continuation():
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(router_type="gru")).eval()
    ids, mask = left_padded_batch()
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    row = ids[2:3, 5:]
    alone = model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=8, do_sample=False)
    assert torch.equal(batched[2, -8:], alone[0, -8:])


# ------------------------------------------------------------------------------------------ initialisation


def test_initialisation_is_gpt2s():
    """GPT-2's scheme: projections N(0, initializer_range), the residual-stream output projections (attention
    `out_proj`, FFN `down_proj`) scaled by 1/sqrt(2 * num_hidden_layers) (the unrolled depth: GPT-2 scales by its
    number of residual additions), biases 0, every module's LayerNorm (1, 0); GRU routers N(0, initializer_range)
    with zero biases."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, router_type="gru")
    model = MoMForCausalLM(config)
    std = config.initializer_range
    residual_std = std / (2 * config.num_hidden_layers) ** 0.5  # 0.02 / sqrt(12): well apart from 0.02
    attention = [m for m in model.modules() if isinstance(m, MoMAttention)]
    ffn = [m for m in model.modules() if isinstance(m, MoMFeedForward)]
    cells = [m for m in model.modules() if isinstance(m, torch.nn.GRUCell)]
    assert len(attention) == len(ffn) == 4 and len(cells) == 2  # bottom, chunk, anchor, top; the chunk's routers

    def pooled(tensors):
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    # >= 7680 samples each: the sample std is within ~1% of the true one, so 5% is ~5 standard errors
    for tensors, expected_std in [
        ([m.qkv_proj for m in attention], std),
        ([m.up_proj for m in ffn], std),
        ([m.out_proj for m in attention], residual_std),
        ([m.down_proj for m in ffn], residual_std),
        ([w for c in cells for w in (c.weight_ih, c.weight_hh)], std),
    ]:
        values = pooled(tensors)
        assert values.numel() >= 7680
        torch.testing.assert_close(values.std(), torch.tensor(expected_std), rtol=0.05, atol=0)
        assert values.mean().abs() < 0.1 * expected_std
    biases = [m.qkv_bias for m in attention] + [m.out_bias for m in attention]
    biases += [m.up_bias for m in ffn] + [m.down_bias for m in ffn] + [c.bias_ih for c in cells]
    biases += [c.bias_hh for c in cells]
    assert not pooled(biases).any()
    norms = [m for m in model.modules() if isinstance(m, MoMPoolNorm)]
    assert len(norms) == 8
    assert (pooled([n.weight for n in norms]) == 1).all() and not pooled([n.bias for n in norms]).any()


# --------------------------------------------------------------------------------------------- routing


def test_router_logits_and_aux_loss():
    config = tiny_config(num_chunks=2, num_rounds=3, enable_skip=True)
    model = MoMForCausalLM(config).eval()
    ids, mask = left_padded_batch()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    # per routed round: attention router, then FFN router; each scores the pool and SKIP
    assert len(out.router_logits) == 2 * config.num_chunks * config.num_rounds
    assert all(r.shape == (ids.numel(), config.num_attention_modules + 1) for r in out.router_logits)
    expected = switch_load_balancing_loss(out.router_logits[0::2], 1, mask) + switch_load_balancing_loss(
        out.router_logits[1::2], 1, mask
    )
    torch.testing.assert_close(out.aux_loss, expected)
    plain = model(ids, attention_mask=mask, labels=ids, output_router_logits=False)
    torch.testing.assert_close(out.loss, plain.loss, atol=0, rtol=0)  # evaluation: the task loss alone
    trained = model.train()(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    torch.testing.assert_close(trained.loss, plain.loss + config.router_aux_loss_coef * out.aux_loss)
    unasked = model(ids, attention_mask=mask, labels=ids)  # training with labels: added unasked, as the authors do
    assert unasked.router_logits is None
    torch.testing.assert_close(unasked.loss, trained.loss, atol=0, rtol=0)


def test_per_round_balancing_loss_averages_each_rounds_attention_and_ffn_losses():
    """`router_aux_loss_per_round` (the authors' `depthwise_bal_loss`): one loss per round, averaged."""
    config = tiny_config(num_chunks=2, num_rounds=3, enable_skip=True, router_aux_loss_per_round=True)
    model = MoMForCausalLM(config).eval()
    ids, mask = left_padded_batch()
    logits = model(ids, attention_mask=mask, output_router_logits=True).router_logits
    per_round = [switch_load_balancing_loss([logits[i]], 1, mask) + switch_load_balancing_loss([logits[i + 1]], 1, mask)
                 for i in range(0, len(logits), 2)]  # fmt: skip
    out = model(ids, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, sum(per_round) / len(per_round))
    model.config.router_aux_loss_per_round = False
    assert not torch.allclose(model(ids, attention_mask=mask, output_router_logits=True).aux_loss, out.aux_loss)


def test_switch_loss_by_hand():
    # two tokens, three choices, top-1: token 0 picks choice 0, token 1 picks choice 2
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    probs = logits.softmax(-1)
    fraction = torch.tensor([0.5, 0.0, 0.5])
    expected = 3 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(switch_load_balancing_loss([logits], 1), expected)
    # padding: the second token is masked out, so only token 0 counts
    masked = switch_load_balancing_loss([logits], 1, torch.tensor([[1, 0]]))
    torch.testing.assert_close(masked, 3 * probs[0, 0])
    # uniform routing gives exactly 1
    torch.testing.assert_close(switch_load_balancing_loss([torch.zeros(6, 3)], 1), torch.tensor(1.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "weighting, gets_gradient",
    [("straight_through", True), ("probability", True), ("renormalize", False), ("score", True),
     ("probability-sign", True), ("renormalize-sign", False)],
)
def test_k1_router_gradient_from_lm_loss(weighting, gets_gradient):
    """With K=1 the renormalised weight is p/p = 1 (no LM gradient); straight-through and probability train it. The
    sign's straight-through gradient reaches the router through the probability, not through p/p."""
    torch.manual_seed(0)
    weighting, _, sign = weighting.partition("-")
    config = tiny_config(router_weighting=weighting, sign_router_weights=bool(sign), router_aux_loss_coef=0.0)
    model = MoMForCausalLM(config).train()
    ids = torch.randint(1, VOCAB, (2, 8))
    model(ids, labels=ids).loss.backward()
    router_grad = model.model.layers[1].mlp_router.out.weight.grad.abs().max()
    # renormalised K=1 weights are p/p: their gradient is zero up to float rounding (~1e-14)
    assert router_grad > 1e-6 if gets_gradient else router_grad < 1e-10


def test_sign_passes_the_gradient_clipped_to_one():
    weights = torch.tensor([-2.0, -0.5, 0.0, 0.3, 4.0], requires_grad=True)
    signs = SignStraightThrough.apply(weights)
    signs.backward(torch.tensor([-3.0, 0.5, 2.0, -0.25, 1.5]))
    assert signs.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert weights.grad.tolist() == [-1.0, 0.5, 1.0, -0.25, 1.0]


def test_signed_module_and_qkv_weights_clip_their_gradients_separately():
    """With `sign_router_weights` and `weighted_qkv`, the output gates and the Q/K/V weights are two uses of the
    router's weights, each through its own sign estimator (as in the authors' code): each use's gradient is clipped
    to [-1, 1] on its own, then they add. Upstream gradients of 0.8 per use give 0.8 + 0.8 = 1.6 at every selected
    logit ("score" weighting: the weights are the logits themselves); one shared estimator would clip the summed
    1.6 to 1. Unselected logits get nothing."""
    config = tiny_config(num_modules_per_tok=2, router_weighting="score", sign_router_weights=True, weighted_qkv=True)
    torch.manual_seed(0)
    logits = torch.randn(5, config.num_attention_modules + 1, requires_grad=True)  # modules + SKIP
    route = route_tokens(logits, config, config.num_attention_modules, weigh_qkv=True)
    top, selected = logits.detach().topk(2, dim=-1)
    assert torch.equal(route.weights, top.sign()) and torch.equal(route.qkv_weights, top.sign())
    ((route.weights * 0.8).sum() + (route.qkv_weights * 0.8).sum()).backward()
    expected = torch.zeros_like(logits).scatter_(1, selected, 1.6)
    torch.testing.assert_close(logits.grad, expected)  # 0.8 + 0.8 in fp32: exact up to one rounding


def test_straight_through_forward_equals_renormalize():
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 8))
    model = MoMForCausalLM(tiny_config(num_modules_per_tok=2)).eval()
    straight = model(ids).logits
    model.config.router_weighting = "renormalize"
    torch.testing.assert_close(model(ids).logits, straight, atol=0, rtol=0)



def _reference_route(router, x, config):
    """mom.md 2.4-2.5 per token: the router's scores over modules and SKIP (softmax unless "score"), then top-k and
    the weighting, or (all modules) every module's probability or score; then the sign if asked for."""
    scores = router.out(torch.relu(router.fc(x))) / config.router_temperature
    scores = scores if config.router_weighting == "score" else scores.softmax(-1)
    if config.routing_mode == "all_modules":
        top = scores[:, : router.out.out_features - int(config.enable_skip)]  # the modules, without SKIP
        selected = torch.arange(top.shape[-1]).expand(top.shape)
    else:
        top, selected = scores.topk(config.num_modules_per_tok, -1)
        if config.router_weighting in ("renormalize", "straight_through"):
            top = top / top.sum(-1, keepdim=True)
    return (top.sign() if config.sign_router_weights else top), selected.tolist()


@pytest.mark.parametrize(
    "overrides",
    [dict(router_weighting=weighting, router_temperature=temperature) for weighting in
     ("renormalize", "probability", "straight_through") for temperature in (1.0, 0.3)]
    + [dict(router_weighting="score"), dict(router_weighting="score", weighted_qkv=True),
       dict(router_weighting="score", sign_router_weights=True),
       dict(router_weighting="probability", routing_mode="all_modules", weighted_qkv=True),
       dict(router_weighting="score", routing_mode="all_modules", sign_router_weights=True)],
    ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()),
)
def test_learned_round_equals_a_per_token_reference(overrides):
    """One learned round (K=2, SKIP on) against mom.md 2.4-2.6 computed token by token: each token's Q, K, V are the
    sum of its chosen attention modules' projections (weighted with `weighted_qkv`), one attention over the round,
    each chosen output projection weighted; the FFN output is the weighted sum of the chosen modules; SKIP
    contributes nothing. With all modules, every module is chosen, weighted by its probability or score."""
    torch.manual_seed(0)
    config = tiny_config(
        num_bottom_layers=0, num_top_layers=0, use_anchor_layers=False, num_rounds=1, num_modules_per_tok=2,
        enable_skip=True, **overrides,
    )
    model = MoMModel(config).eval()
    layer = model.layers[0]
    with torch.no_grad():  # spread the scores so tokens choose different modules and SKIP
        layer.attention_router.out.weight.normal_(0, 1.0)
        layer.mlp_router.out.weight.normal_(0, 1.0)
    seq, d, heads = 7, config.hidden_size, config.num_attention_heads
    ids = torch.randint(1, VOCAB, (1, seq))
    attention, mlp = layer.attention, layer.mlp

    def pool_norm(pool, m, x):
        return torch.nn.functional.layer_norm(x, (d,), pool.norm.weight[m], pool.norm.bias[m], pool.norm.eps)

    with torch.no_grad():
        h = model.embed_tokens(ids)[0] + model.embed_positions(torch.arange(seq))
        weights, selected = _reference_route(layer.attention_router, h, config)
        skipped, attention_weights = any(config.num_attention_modules in row for row in selected), weights
        qkv = torch.zeros(seq, 3 * d)
        for t in range(seq):
            for j, m in enumerate(selected[t]):
                if m < config.num_attention_modules:
                    projected = pool_norm(attention, m, h[t]) @ attention.qkv_proj[m] + attention.qkv_bias[m]
                    qkv[t] += (weights[t, j] if config.weighted_qkv else 1.0) * projected
        q, k, v = qkv.view(seq, 3, heads, d // heads).permute(1, 2, 0, 3)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(seq, d)
        for t in range(seq):
            for j, m in enumerate(selected[t]):
                if m < config.num_attention_modules:
                    h[t] += weights[t, j] * (a[t] @ attention.out_proj[m] + attention.out_bias[m])
        weights, selected = _reference_route(layer.mlp_router, h, config)
        ffn = torch.zeros(seq, d)
        for t in range(seq):
            for j, m in enumerate(selected[t]):
                if m < config.num_ffn_modules:
                    inner = mlp.act(pool_norm(mlp, m, h[t]) @ mlp.up_proj[m] + mlp.up_bias[m])
                    ffn[t] += weights[t, j] * (inner @ mlp.down_proj[m] + mlp.down_bias[m])
        expected = model.norm(h + ffn)
        skipped = skipped or any(config.num_ffn_modules in row for row in selected)
        assert skipped or config.routing_mode == "all_modules", "no token chose SKIP: spread the scores"
        if config.sign_router_weights:
            both = torch.cat([attention_weights, weights])
            assert (both < 0).any() and (both > 0).any(), "spread the scores to both signs"
        torch.testing.assert_close(model(ids).last_hidden_state[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["renormalize", "probability", "score", "probability-weighted_qkv"])
def test_a_module_every_token_picked_runs_as_a_plain_layer_without_autograd(weighting):
    """Batch-1 decoding with K=1: every token of a round picked the same module, which then runs as that module's
    plain layer, weighted (no dispatch). The values equal the dispatch's (used with autograd on)."""
    torch.manual_seed(0)
    weighting, _, weighted_qkv = weighting.partition("-")
    model = MoMForCausalLM(tiny_config(router_weighting=weighting, weighted_qkv=bool(weighted_qkv))).eval()
    for layer in model.model.layers:
        for router in (layer.attention_router, layer.mlp_router):
            if router is not None:
                with torch.no_grad():
                    router.out.bias[1] = 5.0  # module 1 wins for every token, with a probability below 1
    ids = torch.randint(1, VOCAB, (2, 6))
    dispatched = model(ids).logits.detach()
    with torch.no_grad(), mock.patch("modeling_mom.modeling_mom.grouped_linear", wraps=grouped_linear) as spy:
        collapsed = model(ids).logits
    assert spy.call_count == 0
    torch.testing.assert_close(collapsed, dispatched, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), mock.patch(  # biases as the dispatch adds them
        "modeling_mom.modeling_mom.grouped_linear", wraps=grouped_linear
    ) as spy:
        model(ids)
    assert spy.call_count > 0
    with torch.no_grad():  # a token that picked another module keeps the dispatch
        model.model.layers[1].mlp_router.out.bias[1] = 0.0
        route, _ = model.model.layers[1]._route(1, torch.randn(1, 5, 32), 0, None, None)
    assert route.module is None and route.plan is not None


def test_gru_router_state_restarts_at_each_chunk():
    model = MoMModel(tiny_config(router_type="gru", num_chunks=2, num_rounds=3)).eval()
    starts = []  # per attention-router call: whether it got no state (a fresh start)
    for layer in model.layers:
        if layer.attention_router is not None:
            layer.attention_router.register_forward_pre_hook(lambda module, args: starts.append(args[1] is None))
    model(torch.randint(1, VOCAB, (2, 5)))
    assert starts == [True, False, False] * 2


# --------------------------------------------------------------------------------------- training


def test_gradient_accumulation_matches_one_big_batch():
    """Summing the losses of two micro-batches normalised by `num_items_in_batch` gives the big batch's gradient."""
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(routing_mode="sequential"))
    ids = torch.randint(1, VOCAB, (4, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    model(ids, labels=labels).loss.backward()
    big = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    num_items = (labels[:, 1:] != -100).sum()
    for half in (slice(0, 2), slice(2, 4)):
        model(ids[half], labels=labels[half], num_items_in_batch=num_items).loss.backward()
    accumulated = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(accumulated, big):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_accumulated_loss_weights_the_balancing_loss_by_the_share_of_next_token_targets():
    """With the Trainer's `num_items_in_batch`, the training loss is the summed next-token loss over it, plus the
    balancing term times this micro-batch's share of the targets. The targets are the *shifted* labels: a [2, 6]
    batch without -100 has 2 * 5 = 10 of them (not 12), so its share of 20 is 1/2."""
    torch.manual_seed(0)
    config = tiny_config(num_modules_per_tok=2, router_aux_loss_coef=0.1)
    model = MoMForCausalLM(config).train()  # no dropout in tiny_config: train mode is deterministic
    ids = torch.randint(1, VOCAB, (2, 6))
    out = model(ids, labels=ids, num_items_in_batch=torch.tensor(20), output_router_logits=True)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    summed = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
    expected = summed / 20 + config.router_aux_loss_coef * out.aux_loss * (10 / 20)
    # the same fp32 sums in another order: ~1e-7 relative; counting 12 targets would move the loss by ~1e-3
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)


def test_trainer_gradient_accumulation_equals_big_batch(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 10))
    assert_accumulation_equals_big_batch(lambda: MoMForCausalLM(tiny_config(routing_mode="sequential")), ids, tmp_path)


def ops_on_parameters(tensor: torch.Tensor) -> list[str]:
    """The backward nodes of `tensor`'s graph that read a parameter directly (each node once), by name."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if any(type(next_node).__name__ == "AccumulateGrad" for next_node, _ in node.next_functions):
            names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_sequential_rounds_unbind_each_pool_once():
    """Round r of a sequential chunk runs module r: the pools are unbound once per forward (one backward node per
    pool tensor, summing every round's gradient at once), never indexed per round (whose backward would build a
    pool-sized gradient each round: quadratic in the pool size)."""
    model = MoMForCausalLM(tiny_config(routing_mode="sequential", num_chunks=2)).train()
    ids = torch.randint(1, VOCAB, (2, 6))
    names = ops_on_parameters(model(ids, labels=ids).loss)
    pool_tensors = sum(len(pool.pool_tensors()) for pool in model.modules() if isinstance(pool, MoMModulePool))
    assert names.count("UnbindBackward0") == pool_tensors
    assert "SelectBackward0" not in names


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = tiny_config(router_type="gru", num_modules_per_tok=2, output_router_logits=True)
    ids = torch.randint(1, VOCAB, (2, 8))
    reference = MoMForCausalLM(config).state_dict()
    grads = []
    for checkpointing in (False, True):
        model = MoMForCausalLM(config).train()
        model.load_state_dict(reference)
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_pools_last_real_token_with_left_or_right_padding():
    torch.manual_seed(0)
    model = MoMForSequenceClassification(tiny_config(num_labels=3)).eval()
    row = torch.randint(1, VOCAB, (1, 6))
    alone = model(row).logits
    pad = torch.zeros(1, 3, dtype=torch.long)
    ones, zeros = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    right = model(torch.cat([row, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits
    left = model(torch.cat([pad, row], 1), attention_mask=torch.cat([zeros, ones], 1)).logits
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "num_labels, problem_type, labels",
    [
        (3, None, torch.tensor([0, 2])),
        (1, None, torch.tensor([0.5, -1.0])),
        (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ],
)
def test_classifier_losses(num_labels, problem_type, labels):
    torch.manual_seed(0)
    config = tiny_config(num_labels=num_labels, problem_type=problem_type)
    model = MoMForSequenceClassification(config).eval()
    ids = torch.randint(1, VOCAB, (2, 7))

    def task_loss(logits):
        if num_labels == 1:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), labels)
        if problem_type == "multi_label_classification":
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return torch.nn.functional.cross_entropy(logits, labels)

    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, task_loss(out.logits))
    assert out.logits.shape == (2, num_labels)
    evaluated = model(ids, labels=labels, output_router_logits=True)
    torch.testing.assert_close(evaluated.loss, task_loss(out.logits))  # the balancing loss joins in training only
    trained = model.train()(ids, labels=labels)
    router_logits = model.model(ids, output_router_logits=True).router_logits  # attention, FFN per round
    balancing = switch_load_balancing_loss(router_logits[0::2], 1) + switch_load_balancing_loss(router_logits[1::2], 1)
    torch.testing.assert_close(trained.loss, task_loss(trained.logits) + config.router_aux_loss_coef * balancing)


# ----------------------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(router_type="gru")).eval()
    ids, mask = left_padded_batch()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoMForCausalLM)
    assert loaded.config.to_dict()["num_rounds"] == model.config.num_rounds
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_routers_stay_float32_when_loaded_in_bfloat16(tmp_path):
    """`from_pretrained(dtype=bfloat16)` loads the pools, embeddings and norms in bf16 but keeps the routers in fp32
    with their saved values (`_keep_in_fp32_modules_strict`): a top-K choice flips on small logit errors."""
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(num_modules_per_tok=2))
    model.save_pretrained(tmp_path)
    loaded = MoMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    routers = {n: p for n, p in loaded.named_parameters() if "_router." in n}
    assert routers  # the chunk's attention and FFN routers
    saved = dict(model.named_parameters())
    for name, param in routers.items():
        assert param.dtype == torch.float32, name
        assert torch.equal(param, saved[name]), name  # not rounded through bf16
    others = [p for n, p in loaded.named_parameters() if n not in routers]
    assert all(p.dtype == torch.bfloat16 for p in others)
    assert loaded.model.layers[1].attention.qkv_proj.dtype == torch.bfloat16
    # Two guarantees give the above: MoMRouter creates its parameters in fp32, which transformers 5's loader keeps,
    # and `_keep_in_fp32_modules_strict`, the declaration the loader (any version) matches against parameter names
    # (by substring) to force fp32. Either alone passes the load check, so check the declaration as well: it must
    # cover exactly the routers' parameters.
    strict = list(type(model)._keep_in_fp32_modules_strict)
    for name in saved:
        assert any(key in name for key in strict) == (name in routers), name


@pytest.mark.parametrize("routing", ROUTINGS)
def test_layers_offloaded_to_disk_run(tmp_path, routing):
    """accelerate's offloading loads a module's weights only for its own call (MoMPoolNorm's too), so a pool must
    read them there, not unbind them once per forward in the model as it does when they are in memory."""
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(**routing)).eval()
    ids, mask = left_padded_batch()
    model.save_pretrained(tmp_path / "model")
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.embed_positions", "model.norm", "lm_head")}
    device_map.update({f"model.layers.{i}": "disk" for i in range(len(model.model.layers))})
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert offloaded.model.layers[1].mlp.up_proj.is_meta
    torch.testing.assert_close(offloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_remote_code_load_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = MoMForCausalLM(tiny_config(router_type="gru", num_modules_per_tok=2)).eval()
    assert_remote_code_load_matches(model, *left_padded_batch(), tmp_path)
