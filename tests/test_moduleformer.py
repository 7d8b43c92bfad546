"""ModuleFormer: layers against naive references (the attention kernel itself: test_stickbreaking.py), cached
generation, losses, config, save/load, modularity APIs.

Tolerances: fp32 kernels are compared with float64 references at 1e-5 (accumulated fp32 rounding over a few dozen
terms is ~1e-6); two fp32 computations of the same function in different orders (cached vs full, padded vs
unpadded) at 1e-5; bit-identical paths (save/load) exactly.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from modeling_mom import ModuleFormerConfig, ModuleFormerForCausalLM, ModuleFormerForSequenceClassification
from modeling_mom.routing_losses import mutual_information_loss, router_z_loss, switch_load_balancing_loss
from modeling_mom.shared_modeling import CACHE_FIELD

from .cache_contract import assert_caches_generate_what_the_dynamic_cache_does
from .remote_contract import assert_remote_code_load_matches
from .test_stickbreaking import naive_stick_breaking
from .trainer_contract import assert_accumulation_equals_big_batch

ATOL = 1e-5
PAD = 0


def tiny_config(**overrides) -> ModuleFormerConfig:
    kwargs = dict(
        vocab_size=53,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        attention_hidden_size=16,
        intermediate_size=24,
        num_attention_experts=4,
        num_attention_experts_per_tok=2,
        num_experts=6,
        num_experts_per_tok=2,
        router_hidden_size=8,
        stick_breaking_chunk_size=3,  # several blocks, the last one partial
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return ModuleFormerConfig(**kwargs)


def tiny_model(seed=0, **overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(seed)
    model = ModuleFormerForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # larger routers than the default init, so routing differs between tokens
        for layer in model.model.layers:
            for pool in (layer.self_attn, layer.mlp):
                pool.router.out.weight.normal_(0.0, 1.0)
    return model


def naive_router(router, x):
    probs = torch.softmax(router.out(F.gelu(router.fc(x))).double(), -1)[:, : router.num_experts]
    gates, selected = probs.topk(router.num_selected, -1)
    if router.normalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return gates, selected


@pytest.mark.parametrize("normalize", [False, True])
def test_experts_match_per_expert_reference(normalize):
    """The MoA and FFN layers equal a loop over each token's selected experts (float64)."""
    model = tiny_model(normalize_expert_gates=normalize, expert_bias=True)
    layer = model.model.layers[0]
    torch.manual_seed(2)
    with torch.no_grad():
        for pool in (layer.self_attn, layer.mlp):
            pool.input_bias.normal_()
            pool.output_bias.normal_()
    x = torch.randn(2, 5, 32)
    attn, mlp = layer.self_attn, layer.mlp

    expected_mlp = torch.zeros(10, 32, dtype=torch.float64)
    flat = x.reshape(10, 32)
    gates, selected = naive_router(mlp.router, flat)
    for n in range(10):
        for g, e in zip(gates[n], selected[n]):
            h = F.gelu(flat[n].double() @ mlp.input_proj[e].double() + mlp.input_bias[e], approximate="tanh")
            expected_mlp[n] += g * (h @ mlp.output_proj[e].double() + mlp.output_bias[e])
    torch.testing.assert_close(layer._feed_forward(x).reshape(10, 32).double(), expected_mlp, atol=ATOL, rtol=0)

    keys = attn.k_proj(x).view(2, 5, 2, 8).transpose(1, 2)  # [B, H, T, 8]
    values = attn.v_proj(x).view(2, 5, 2, 8).transpose(1, 2)
    gates, selected = naive_router(attn.router, flat)
    expected_attn = torch.zeros(2, 5, 32, dtype=torch.float64)
    for b in range(2):
        for t in range(5):
            n = b * 5 + t
            for g, e in zip(gates[n], selected[n]):
                q = (x[b, t].double() @ attn.input_proj[e].double() + attn.input_bias[e]).view(1, 2, 1, 1, 8)
                o = naive_stick_breaking(q, keys[b : b + 1, :, : t + 1], values[b : b + 1, :, : t + 1])
                expected_attn[b, t] += g * (o.reshape(16) @ attn.output_proj[e].double() + attn.output_bias[e])
    torch.testing.assert_close(attn(x)[0].double(), expected_attn, atol=ATOL, rtol=0)


MOLM_LAYOUT = {"num_attention_heads": 1, "attention_hidden_size": 32}


def test_molm_layout_uses_hidden_states_as_keys_and_values():
    """Keys = values = the normalised hidden states; the cache holds them once (its values are zero wide), and
    cached decoding equals the full forward (test below)."""
    model = tiny_model(**MOLM_LAYOUT)
    assert model.model.layers[0].self_attn.k_proj is None
    assert not any("k_proj" in name or "v_proj" in name for name in model.state_dict())
    ids = torch.randint(3, 53, (1, 6))
    out = model(ids, use_cache=True)
    assert torch.isfinite(out.logits).all()
    layer = getattr(out, CACHE_FIELD).layers[0]
    assert layer.keys.shape == (1, 1, 6, 32) and layer.values.shape == (1, 1, 6, 0)


# ------------------------------------------------------------------------------------------- model behaviour


@pytest.mark.parametrize(
    "attention",
    [
        {},
        {"attention_function": "stickbreaking_2024"},
        {"attention_function": "softmax", "position_embedding_type": "learned"},
        MOLM_LAYOUT,
    ],
)
def test_incremental_decoding_equals_full_forward(attention):
    model = tiny_model(**attention)
    ids = torch.randint(3, 53, (2, 9))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = getattr(out, CACHE_FIELD)
    for t in range(5, 9):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


def left_padded_batch():
    torch.manual_seed(3)
    long, short = torch.randint(3, 53, (1, 8)), torch.randint(3, 53, (1, 5))
    ids = torch.cat([long, torch.cat([torch.full((1, 3), PAD), short], 1)])
    mask = torch.cat([torch.ones(1, 8), torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], 1)]).long()
    return ids, mask, short


@pytest.mark.parametrize("attention", [{}, {"attention_function": "stickbreaking_2024"}])
def test_left_padding_is_transparent(attention):
    model = tiny_model(**attention)
    ids, mask, short = left_padded_batch()
    padded = model(ids, attention_mask=mask).logits[1, 3:]
    torch.testing.assert_close(padded, model(short).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "attention",
    [{}, {"attention_function": "softmax", "position_embedding_type": "learned"}, MOLM_LAYOUT],
    ids=["sb", "softmax", "molm"],
)
def test_cached_generation_equals_uncached(attention):
    model = tiny_model(**attention)
    ids, mask, short = left_padded_batch()
    for kwargs in ({"num_beams": 1}, {"num_beams": 3}):
        common = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, **kwargs)
        cached = model.generate(ids, use_cache=True, **common)
        uncached = model.generate(ids, use_cache=False, **common)
        assert torch.equal(cached, uncached), kwargs
        if attention.get("attention_function", "stickbreaking") == "stickbreaking":
            # stick-breaking: the left-padded row generates what the unpadded prompt does
            alone = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=PAD, **kwargs)
            assert torch.equal(cached[1, 3:], alone[0]), kwargs


@pytest.mark.parametrize("attention", [{}, {"attention_function": "softmax", "position_embedding_type": "learned"}])
def test_output_attentions(attention):
    """Returning the weights (eager path) changes nothing else; per head and selected expert, over all keys."""
    model = tiny_model(**attention)
    ids, mask, _ = left_padded_batch()
    out = model(ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.logits, model(ids, attention_mask=mask).logits, atol=ATOL, rtol=0)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2 * 2, 8, 8)  # heads * k_att
    totals = out.attentions[0][1, :, 3:].sum(-1)  # real rows of the left-padded sequence
    if attention:
        torch.testing.assert_close(totals, torch.ones_like(totals))
    else:  # stick-breaking drops the remainder: at most 1
        assert totals.max() <= 1 + 1e-6 and totals.min() > 0
    assert out.attentions[0][1, :, 3:, :3].abs().max() == 0  # real rows give padding keys nothing


def test_stickbreaking_2024_does_not_attend_to_the_current_key():
    """Tan et al. 2024 (`stickbreaking_2024`): query i breaks its stick over keys j < i only, and the remainder goes to
    its own value outside the weights, so each query's weight on its own position is exactly 0 (its key gets
    l = -inf) and the first query's row is all 0; the official variant attends to keys j <= i, its own included."""
    ids = torch.randint(3, 53, (2, 7), generator=torch.Generator().manual_seed(0))
    diagonals = {}
    for attention in ("stickbreaking", "stickbreaking_2024"):
        model = tiny_model(attention_function=attention)
        out = model(ids, output_attentions=True)
        torch.testing.assert_close(out.logits, model(ids).logits, atol=ATOL, rtol=0)
        for weights in out.attentions:  # [B, heads * k, T, T]
            assert weights.triu(1).abs().max() == 0  # causal
            diagonals.setdefault(attention, []).append(weights.diagonal(dim1=-2, dim2=-1))
    for official, tan in zip(diagonals["stickbreaking"], diagonals["stickbreaking_2024"]):
        assert official.min() > 0
        assert tan.abs().max() == 0


def test_sequence_classifier_left_padding_and_loss():
    torch.manual_seed(0)
    model = ModuleFormerForSequenceClassification(tiny_config(num_labels=3, router_aux_loss_coef=0.1)).eval()
    ids, mask, short = left_padded_batch()
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    torch.testing.assert_close(out.logits[1], model(short).logits[0], atol=ATOL, rtol=0)
    ce = F.cross_entropy(out.logits, torch.tensor([0, 2]))
    torch.testing.assert_close(out.loss, ce)  # evaluation: the task loss alone
    trained = model.train()(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    router_logits = model.model(ids, attention_mask=mask, output_router_logits=True).router_logits
    router_loss = sum(mutual_information_loss(r, mask) for r in router_logits)  # training: the router loss is added
    ce = F.cross_entropy(trained.logits, torch.tensor([0, 2]))
    torch.testing.assert_close(trained.loss, ce + 0.1 * router_loss)
    trained.loss.backward()
    assert model.model.layers[0].mlp.router.fc.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- losses


def test_mutual_information_loss_by_hand():
    torch.manual_seed(4)
    logits = torch.randn(6, 3)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])  # rows 0 and 5 are padding
    real = [1, 2, 3, 4]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    marginal = [sum(probs[n][e] for n in real) / len(real) for e in range(3)]
    h_marginal = -sum(p * math.log(p) for p in marginal)
    h_conditional = -sum(p * math.log(p) for n in real for p in probs[n]) / len(real)
    loss = mutual_information_loss(logits, mask)
    assert loss.item() == pytest.approx(h_conditional - h_marginal, abs=1e-6)
    torch.testing.assert_close(mutual_information_loss(logits[1:5]), loss)  # padding rows are ignored


def test_model_aux_losses_sum_over_routers():
    model = tiny_model(router_aux_loss_coef=0.5, num_attention_experts_per_tok=1)  # each router's own k below
    ids, mask, _ = left_padded_batch()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert [r.shape[-1] for r in out.router_logits] == [4, 6, 4, 6]
    expected = sum(mutual_information_loss(r, mask) for r in out.router_logits)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, model.loss_function(out.logits, ids, model.config.vocab_size))  # eval
    trained = model.train()(ids, attention_mask=mask, labels=ids)  # training: the router loss joins unasked
    lm_only = trained.loss - 0.5 * trained.aux_loss
    torch.testing.assert_close(lm_only, model.loss_function(trained.logits, ids, model.config.vocab_size))
    assert model(ids).router_logits is None  # not requested, not returned

    model.config.aux_loss_type = "switch"
    out = model(ids, attention_mask=mask, output_router_logits=True)
    k = [1, 2, 1, 2]  # attention, MLP per layer
    expected = sum(
        switch_load_balancing_loss([r], k[i], mask) + 0.1 * router_z_loss(r, mask)
        for i, r in enumerate(out.router_logits)
    )
    torch.testing.assert_close(out.aux_loss, expected)


def test_concentration_loss_is_added_with_its_weight():
    model = tiny_model(concentration_loss_coef=0.25).train()  # the router losses join the loss in training
    ids, mask, _ = left_padded_batch()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    by_hand = 0.0
    for logits in out.router_logits:  # entropy of the mean routing distribution over real tokens
        marginal = torch.softmax(logits, -1)[mask.reshape(-1).bool()].mean(0)
        by_hand = by_hand - (marginal * marginal.log()).sum()
    lm = model.loss_function(out.logits, ids, model.config.vocab_size)
    torch.testing.assert_close(out.loss, lm + 0.25 * by_hand)  # router_aux_loss_coef is 0: only concentration


# ----------------------------------------------------------------------------------------------------- config

MOLM_700M_8B = {
    "vocab_size": 50295, "block_size": 512, "history_length": 512, "n_embd": 1024, "n_layer": 48, "n_head": 1,
    "att_hidden": 1024, "ffd_hidden": 2048, "activation_function": "gelu_new", "resid_pdrop": 0, "embd_pdrop": 0,
    "attn_pdrop": 0, "moe_pdrop": 0, "sample_topk": 0, "gating_size": 256, "n_att_experts": 16, "k_att": 2,
    "n_mlp_experts": 32, "k_mlp": 2, "layer_norm_epsilon": 1e-05, "initializer_range": 0.02, "use_cache": True,
    "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": False, "aux_loss_type": "mi",
    "aux_loss_weight": 0, "gate_type": "mlp", "att_func": "stickbreaking", "local_size": 1, "moe_type": "moe",
    "pre_norm": True, "universal": False, "world_size": None, "n_ctx": 24576, "torch_dtype": "bfloat16",
    "architectures": ["ModuleFormerForCausalLM"], "model_type": "moduleformer", "transformers_version": "4.28.1",
}  # fmt: skip


def test_official_molm_config_keys_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MOLM_700M_8B))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ModuleFormerConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 48, 1)
    assert (config.attention_hidden_size, config.intermediate_size, config.router_hidden_size) == (1024, 2048, 256)
    assert (config.num_attention_experts, config.num_attention_experts_per_tok) == (16, 2)
    assert (config.num_experts, config.num_experts_per_tok) == (32, 2)
    assert config.shares_hidden_states_as_kv and config.attention_function == "stickbreaking"
    assert config.n_embd == 1024 and config.k_att == 2  # the official names read through too


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"num_attention_experts_per_tok": 5}, "num_attention_experts_per_tok=5"),
        ({"k_mlp": 7}, "num_experts_per_tok=7"),
        ({"attention_hidden_size": 15}, "attention_hidden_size=15"),
        ({"attention_function": "linear"}, "attention_function='linear'"),
        ({"position_embedding_type": "rope"}, "position_embedding_type='rope'"),
        ({"aux_loss_type": "entropy"}, "aux_loss_type='entropy'"),
        ({"mlp_experts_per_layer": [6]}, "mlp_experts_per_layer has 1 entries"),
        ({"resid_pdrop": 1.5}, "resid_dropout=1.5"),
        ({"sample_topk": 1}, "sample_topk=1"),
        ({"gate_type": "gmm"}, "router_type=.gmm."),
        ({"normalize_expert_gates": True, "pruned_mlp_experts_per_layer": [2, 2]}, "pruned_mlp_experts_per_layer=.2"),
    ],
)
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        tiny_config(**bad)


# ------------------------------------------------------------------------------------- training & save/load


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(router_aux_loss_coef=0.3).train()
    ids = torch.randint(3, 53, (2, 7))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    assert plain["model.layers.0.self_attn.router.fc.weight"].abs().sum() > 0  # the router loss reaches routers
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("attention", ["stickbreaking", "stickbreaking_2024"])
def test_recomputed_stick_breaking_weights_give_the_same_gradients(attention):
    """`stick_breaking_recompute_weights` trades the kept weights (memory O(T * S)) for time: the same arithmetic."""
    ids = torch.randint(3, 53, (2, 7))
    grads = []
    for recompute in (False, True):
        model = tiny_model(attention_function=attention, stick_breaking_recompute_weights=recompute).train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "model.layers.0.self_attn.k_proj.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=0, rtol=0, msg=name)


def test_loss_honours_num_items_in_batch():
    """The Trainer passes the token count of the whole accumulated batch; the loss is then a sum divided by it."""
    model = tiny_model()
    ids = torch.randint(3, 53, (2, 6))
    out = model(ids, labels=ids, num_items_in_batch=torch.tensor(40))
    summed = F.cross_entropy(out.logits[:, :-1].reshape(-1, 53), ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, summed / 40)


def test_trainer_gradient_accumulation_equals_big_batch(tmp_path):
    assert_accumulation_equals_big_batch(tiny_model, torch.randint(3, 53, (8, 6)), tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_resume_loads_every_weight_without_missing_keys(tied, tmp_path):
    """Resuming a Trainer run must not report the tied head (absent from the checkpoint) as missing, and must restore
    every weight exactly, the tie included."""
    from transformers import Trainer, TrainingArguments
    from transformers.testing_utils import CaptureLogger
    from transformers.trainer import logger

    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 53, (4, 6))]
    args = TrainingArguments(tmp_path, max_steps=2, save_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, disable_tqdm=True)  # fmt: skip
    trained = tiny_model(tie_word_embeddings=tied).train()
    Trainer(model=trained, args=args, train_dataset=rows).train()
    resumed = tiny_model(seed=1, tie_word_embeddings=tied)
    with CaptureLogger(logger) as captured:  # the checkpoint is at max_steps: it is loaded, no step is taken
        Trainer(model=resumed, args=args, train_dataset=rows).train(resume_from_checkpoint=True)
    assert "missing keys" not in captured.out and "unexpected keys" not in captured.out, captured.out
    assert (resumed.lm_head.weight is resumed.model.embed_tokens.weight) == tied
    for name, weight in trained.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], weight), name



def test_a_mask_that_is_not_a_2d_padding_mask_is_refused_by_shape():
    model = tiny_model()
    ids = torch.randint(3, 53, (2, 5))
    causal = torch.ones(2, 1, 5, 5).tril()
    for mask in (causal, torch.ones(2, 4)):
        with pytest.raises(ValueError, match=r"needs a 2-D padding mask of shape \(batch, past \+ current length\)"):
            model(ids, attention_mask=mask)

def test_a_legacy_tuple_cache_is_refused_with_its_remedy():
    """A tuple of (keys, values) per layer was refused as a cache "whose layers have a fixed size or are paged";
    the message now says what it is, and the remedy it names gives the cached logits."""
    from transformers import DynamicCache

    model = tiny_model().eval()
    ids = torch.randint(3, 53, (1, 8))
    cache = model(ids[:, :5], use_cache=True).cache
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    with pytest.raises(ValueError, match=r"got a tuple, which is no Cache \(legacy tuples .* DynamicCache\(\.\.\.\)\)"):
        model(ids[:, 5:], cache=legacy)
    logits = model(ids[:, 5:], cache=DynamicCache(legacy)).logits
    torch.testing.assert_close(logits, model(ids).logits[:, 5:], atol=ATOL, rtol=0)


def test_a_fixed_size_cache_is_refused_clearly():
    """A static cache returns all its slots, filled or not, and generation turns the mask 4-D for it: refused by name
    (it failed on the mask, and a hand-made StaticCache gave wrong logits)."""
    from transformers import StaticCache

    model = tiny_model().eval()
    ids = torch.randint(3, 53, (1, 5))
    with pytest.raises(ValueError, match="in a DynamicCache, or another .* got StaticCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match="in a DynamicCache, or another"):
        model(ids, cache=StaticCache(config=model.config, max_cache_len=16), use_cache=True)
    paged = "continuous batching .* keeps them paged"  # it would log a failing forward and return no tokens
    with pytest.raises(ValueError, match=paged):
        model.generate_batch([[5, 6, 7]], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False))
    with pytest.raises(ValueError, match=paged):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="paged")


def test_experts_start_as_the_official_parallel_experts_do():
    """Every expert bank, and the rows `add_experts` appends, drawn from U(-1/in, 1/in) as IBM's
    `ParallelExperts.reset_parameters` draws them: within the bound, with a uniform's std (bound / sqrt(3); within
    10%, a margin of more than 5 standard errors at these sample sizes)."""
    torch.manual_seed(0)
    model = ModuleFormerForCausalLM(tiny_config())
    old_counts = [pool.num_experts for _, _, pool in model._expert_pools()]
    model.add_experts(2)
    for (_, _, pool), old in zip(model._expert_pools(), old_counts):
        for weight in (pool.input_proj, pool.output_proj):
            bound = 1.0 / weight.shape[1]
            for rows in (weight[:old], weight[old:]):
                assert rows.abs().max() <= bound
                assert abs(rows.std().item() / (bound / 3**0.5) - 1) < 0.1


@pytest.mark.parametrize("layout", [MOLM_LAYOUT, {}], ids=["molm-layout", "kv-projections"])
def test_quantized_cache_generates_what_the_dynamic_cache_does(layout):
    """The fp8 quantized cache (transformers' dependency-free backend): the MoLM layout, whose dynamic cache holds
    zero-wide values, stores its keys as values too (it failed quantizing an empty tensor). Logits within fp8's
    rounding for as long as the greedy tokens agree (see `cache_contract`)."""
    model = tiny_model(**layout).eval()
    ids = torch.randint(3, 53, (2, 6), generator=torch.Generator().manual_seed(0))
    assert_caches_generate_what_the_dynamic_cache_does(model, ids, torch.ones_like(ids), 0, ["quantized"])


def check_remote_load(model, path):
    """Load `path` through `trust_remote_code` in a fresh process without the package; compare with `model`."""
    ids, mask, _ = left_padded_batch()
    assert_remote_code_load_matches(model, ids, mask, path, atol=ATOL)


# --------------------------------------------------------------------------------------------- modularity


def test_expert_usage_counts_real_tokens():
    """Batches as tensors, dicts or a tokenizer's / collator's `BatchEncoding` (which is not a dict)."""
    from transformers import BatchEncoding

    model = tiny_model()
    ids, mask, _ = left_padded_batch()
    usage = model.expert_usage([BatchEncoding({"input_ids": ids, "attention_mask": mask}), ids[:1]])
    assert [len(c) for c in usage["attention"]] == [4, 4] and [len(c) for c in usage["mlp"]] == [6, 6]
    for counts in usage["attention"] + usage["mlp"]:
        assert counts.sum() == (13 + 8) * 2  # real tokens x k
    as_dicts = model.expert_usage([{"input_ids": ids, "attention_mask": mask}, ids[:1]])
    assert all(torch.equal(a, b) for kind in usage for a, b in zip(usage[kind], as_dicts[kind]))


@pytest.mark.parametrize("normalize", [False, True], ids=["official_gates", "normalized_gates"])
def test_pruned_model_keeps_logits_and_round_trips(normalize, tmp_path):
    model = tiny_model(normalize_expert_gates=normalize, num_attention_experts=6, num_experts=8)
    ids = torch.randint(3, 53, (1, 3))
    before = model(ids).logits
    usage = model.expert_usage([ids])
    kept = model.prune_experts(usage, threshold=0.0)
    assert [len(k) for k in kept["mlp"]] == [int((c > 0).sum()) for c in usage["mlp"]]
    assert model.config.mlp_experts_per_layer == [len(k) for k in kept["mlp"]]
    assert sum(model.config.mlp_experts_per_layer) < 16  # something was pruned
    torch.testing.assert_close(model(ids).logits, before, atol=ATOL, rtol=0)

    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    if not normalize:  # one subprocess is enough: the remote code path is the same for both gate modes
        check_remote_load(model, tmp_path / "pruned")


def test_experts_implementations_agree_after_pruning_and_extension():
    """transformers' `grouped_mm` and `batched_mm` kernels run the FFN experts (with biases) as our dispatch does, also
    on pools pruned and then extended; fp32, within 1e-6 (sums in another order: ~6e-8 here)."""
    model = tiny_model(expert_bias=True, num_experts=8)
    ids = torch.randint(3, 53, (2, 9))
    model.prune_experts(model.expert_usage([ids]), keep_top_n=5)
    model.add_experts(2)
    assert model.config._experts_implementation == "eager"  # the shared dispatch by default
    expected = model(ids).logits
    for implementation in ("grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)


def test_prune_threshold_is_a_share_of_each_routers_selections():
    model = tiny_model()  # 4 attention experts, 6 MLP experts, k = 2 each
    usage = {"attention": [torch.tensor([5, 4, 1, 0])] * 2, "mlp": [torch.tensor([6, 3, 1, 0, 0, 0])] * 2}
    kept = model.prune_experts(usage, threshold=0.15)  # shares 0.5, 0.4, 0.1, 0 and 0.6, 0.3, 0.1, 0, ...
    assert [k.tolist() for k in kept["attention"] + kept["mlp"]] == [[0, 1]] * 4
    assert model.config.mlp_experts_per_layer == [2, 2] and model.config.attention_experts_per_layer == [2, 2]
    for threshold in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"threshold={threshold} must be a share of selections in"):
            tiny_model().prune_experts(usage, threshold=threshold)


def test_prune_keep_top_n_breaks_ties_by_the_lower_index():
    """`keep_top_n` keeps the most used experts, ties going to the lower index (as documented); with `threshold` as
    well an expert must meet both. The kept experts' weights and router rows are the original ones, in order."""
    model = tiny_model()  # 4 attention experts, 6 MLP experts, k = 2 each
    original = [(pool.input_proj.clone(), pool.router.out.weight.clone()) for _, _, pool in model._expert_pools()]
    usage = {"attention": [torch.tensor([3, 5, 3, 3])] * 2, "mlp": [torch.tensor([3, 5, 3, 0, 3, 1])] * 2}
    kept = model.prune_experts(usage, keep_top_n=3)  # expert 1, then the lowest two of the tied 3s: 0 and 2
    assert [k.tolist() for k in kept["attention"] + kept["mlp"]] == [[0, 1, 2]] * 4
    assert model.config.attention_experts_per_layer == [3, 3] and model.config.mlp_experts_per_layer == [3, 3]
    for (_, _, pool), (experts, rows) in zip(model._expert_pools(), original):
        assert torch.equal(pool.input_proj, experts[[0, 1, 2]])
        assert torch.equal(pool.router.out.weight[:3], rows[[0, 1, 2]])  # live rows first (normaliser rows after)

    model = tiny_model()
    usage = {"attention": [torch.tensor([3, 5, 3, 3])] * 2, "mlp": [torch.tensor([6, 1, 0, 6, 2, 0])] * 2}
    kept = model.prune_experts(usage, keep_top_n=3, threshold=0.14)  # MLP shares 0.4, 0.07, 0, 0.4, 0.13, 0
    assert [k.tolist() for k in kept["attention"]] == [[0, 1, 2]] * 2  # the tie, as above; all shares > 0.2
    assert [k.tolist() for k in kept["mlp"]] == [[0, 3]] * 2  # top 3 are 0, 3, 4; 4's share is under the threshold


def pruned_then_grown(**overrides):
    """A model pruned to 2 live experts per router (official gates: the other rows stay as softmax normaliser rows),
    with the router weights of that state, then grown by one expert per router, only the new one trainable."""
    model = tiny_model(**overrides)  # 4 attention experts, 6 MLP experts, k = 2 each
    usage = {"attention": [torch.tensor([0, 4, 0, 4])] * 2, "mlp": [torch.tensor([0, 0, 4, 4, 0, 0])] * 2}
    model.prune_experts(usage, keep_top_n=2)
    assert not model.config.normalize_expert_gates and model.config.pruned_mlp_experts_per_layer == [4, 4]
    pruned = [(pool.input_proj.clone(), pool.router.out.weight.clone()) for _, _, pool in model._expert_pools()]
    model.add_experts(1, freeze_existing=True)
    return model, pruned


def test_add_experts_after_pruning_puts_new_router_rows_before_the_normaliser_rows():
    """The router's rows are the live experts' then the pruned experts' (kept for the softmax's normaliser only); a
    new expert's row goes after the live rows: the first `num_experts` rows are the live ones the top-k picks from."""
    model, pruned = pruned_then_grown()
    for (_, kind, pool), (experts, rows) in zip(model._expert_pools(), pruned):
        weight = pool.router.out.weight
        assert pool.num_experts == pool.router.num_experts == 3, kind
        assert weight.shape[0] == rows.shape[0] + 1 and pool.input_proj.shape[0] == 3
        assert torch.equal(weight[:2], rows[:2]), kind  # the old live rows
        assert torch.equal(weight[3:], rows[2:]), kind  # the pruned experts' normaliser rows, after the new row
        assert torch.equal(pool.input_proj[:2], experts)
    assert model.config.mlp_experts_per_layer == [3, 3] and model.config.pruned_mlp_experts_per_layer == [4, 4]
    assert model.config.pruned_attention_experts_per_layer == [2, 2]


def test_add_experts_after_pruning_trains_only_the_new_rows():
    """With `freeze_existing`, only the new expert and its router row get gradients: not the old live rows, and not
    the pruned experts' normaliser rows after the new row, which the softmax otherwise gives a gradient."""
    model, _ = pruned_then_grown()
    ids = torch.randint(3, 53, (2, 6), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    for _, kind, pool in model._expert_pools():  # 3 live experts, k = 2: the new one (index 2) is used
        router = pool.router.out.weight.grad
        assert router[:2].abs().max() == 0 and router[3:].abs().max() == 0, kind
        assert router[2].abs().max() > 0, kind
        for weight in (pool.input_proj, pool.output_proj):
            assert weight.grad[:2].abs().max() == 0 and weight.grad[2].abs().max() > 0, kind


def test_prune_rejects_bad_requests():
    model = tiny_model()
    usage = model.expert_usage([torch.randint(3, 53, (1, 4))])
    with pytest.raises(ValueError, match="keep_top_n and/or threshold"):
        model.prune_experts(usage)
    with pytest.raises(ValueError, match="fewer than the 2"):
        model.prune_experts(usage, keep_top_n=1)
    with pytest.raises(ValueError, match="has shape"):
        model.prune_experts({"attention": [torch.ones(3)] * 2, "mlp": usage["mlp"]}, threshold=0.0)
    with pytest.raises(ValueError, match="keep_top_n=2.5 must be a positive integer"):
        model.prune_experts(usage, keep_top_n=2.5)
    with pytest.raises(ValueError, match=r"one entry per layer \(2\)"):  # another model's usage, of more layers
        model.prune_experts({kind: counts * 2 for kind, counts in usage.items()}, threshold=0.0)
    negative = {"attention": usage["attention"], "mlp": [torch.tensor([-5, 1, 1, 1, 1, 1])] * 2}
    with pytest.raises(ValueError, match=r"usage\['mlp'\]\[0\] = \[-5, 1, 1, 1, 1, 1\]; selection counts"):
        model.prune_experts(negative, threshold=0.0)


@pytest.mark.parametrize("num_new", [0, 1.5, True, "2"])
def test_add_experts_refuses_anything_but_a_positive_count_before_changing_the_model(num_new):
    model = tiny_model()
    before = {name: (p.shape, p.requires_grad) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"num_new={num_new!r} must be a positive integer"):
        model.add_experts(num_new)
    assert {name: (p.shape, p.requires_grad) for name, p in model.named_parameters()} == before


def test_add_experts_trains_only_new_experts(tmp_path):
    model = tiny_model().train()
    old = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.add_experts(2, freeze_existing=True)
    with torch.no_grad():  # route to the new experts as often as to the old ones (see tiny_model)
        for layer in model.model.layers:
            for pool in (layer.self_attn, layer.mlp):
                pool.router.out.weight[-2:].normal_(0.0, 1.0)
    assert model.config.attention_experts_per_layer == [6, 6] and model.config.mlp_experts_per_layer == [8, 8]
    grown = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    ids = torch.randint(3, 53, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    new_rows_moved = []
    for name, param in model.named_parameters():
        num_old = old[name].shape[0]
        assert torch.equal(param[:num_old], old[name]), name  # every old row is exactly unchanged
        if param.shape != old[name].shape:
            new_rows_moved.append(not torch.equal(param[num_old:], grown[name][num_old:]))
    assert len(new_rows_moved) == 2 * 2 * 3 and all(new_rows_moved)  # layers x pools x (in, out, router rows)
    model.save_pretrained(tmp_path / "grown")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "grown").eval()
    torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------ official MoLM checkpoints


def official_checkpoint(config: dict, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as in an official ModuleFormer checkpoint (moduleformer.md §1.10)."""
    torch.manual_seed(seed)
    d, a, f, g = config["n_embd"], config["att_hidden"], config["ffd_hidden"], config["gating_size"]
    state = {"transformer.wte.weight": torch.randn(config["vocab_size"], d), "lm_head.weight": torch.randn(50, d) * 0.2}
    state.update({"transformer.ln_f.weight": 1 + 0.1 * torch.randn(d), "transformer.ln_f.bias": 0.1 * torch.randn(d)})
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            state.update({p + ln + ".weight": 1 + 0.1 * torch.randn(d), p + ln + ".bias": 0.1 * torch.randn(d)})
        for moe, num, inner in (("attn.q_proj.", config["n_att_experts"], a), ("mlpf.", config["n_mlp_experts"], f)):
            state[p + moe + "experts.weight"] = torch.randn(num, d, inner) / d**0.5
            state[p + moe + "output_experts.weight"] = torch.randn(num, inner, d) / inner**0.5
            if config.get("expert_bias"):  # ParallelExperts(..., bias=True): one bias row per expert
                state[p + moe + "experts.bias"] = 0.3 * torch.randn(num, inner)
                state[p + moe + "output_experts.bias"] = 0.3 * torch.randn(num, d)
            if config.get("gate_type", "mlp") == "linear":  # w_gate = nn.Sequential(nn.Linear(d, E, bias=False))
                state[p + moe + "gate.w_gate.0.weight"] = torch.randn(num, d)
            else:  # Sequential(Linear(d, g), GELU, Dropout, Linear(g, E, bias=False))
                state[p + moe + "gate.w_gate.0.weight"] = torch.randn(g, d) / d**0.5
                state[p + moe + "gate.w_gate.0.bias"] = 0.1 * torch.randn(g)
                state[p + moe + "gate.w_gate.3.weight"] = torch.randn(num, g)
        if not (config["n_head"] == 1 and a == d):
            for proj in ("k_proj", "v_proj"):
                state[p + f"attn.{proj}.weight"] = torch.randn(a, d) / d**0.5
                state[p + f"attn.{proj}.bias"] = 0.1 * torch.randn(a)
        state[p + "attn.mask"] = torch.tril(torch.ones(8, 8, dtype=torch.int8))  # buffers the loader must drop
        state[p + "attn.cum_weight"] = torch.tril(torch.ones(8, 8), -1)
    return state


def official_forward(state, config, ids):
    """The official HF ModuleFormer forward (IBM/ModuleFormer 850f1eb), transcribed in float64, no cache."""
    sd = {k: v.double() for k, v in state.items()}
    d, heads, k_att, k_mlp = config["n_embd"], config["n_head"], config["k_att"], config["k_mlp"]
    batch, seq = ids.shape

    def gate(prefix, x, k):  # top_k_gating: MLP (or linear), softmax over all experts, top-k, gates not renormalised
        if prefix + "3.weight" not in sd:  # gate_type "linear"
            return torch.softmax(F.linear(x, sd[prefix + "0.weight"]), -1).topk(k, -1)
        logits = F.linear(F.gelu(F.linear(x, sd[prefix + "0.weight"], sd[prefix + "0.bias"])), sd[prefix + "3.weight"])
        return torch.softmax(logits, -1).topk(k, -1)

    def bias(name, experts):  # ParallelLinear adds bias[e] to expert e's rows; absent: bias=False
        return sd[name][experts] if name in sd else 0

    def layer_norm(x, name):
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"])

    h = sd["transformer.wte.weight"][ids]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        x = layer_norm(h, p + "ln_1").reshape(-1, d)
        gates, experts = gate(p + "attn.q_proj.gate.w_gate.", x, k_att)
        q = torch.einsum("nd,nkda->nka", x, sd[p + "attn.q_proj.experts.weight"][experts])
        q = q + bias(p + "attn.q_proj.experts.bias", experts)
        kv = {}
        for proj in ("k_proj", "v_proj"):
            name = p + f"attn.{proj}.weight"
            kv[proj] = x if name not in sd else F.linear(x, sd[name], sd[p + f"attn.{proj}.bias"])
        head = q.shape[-1] // heads
        q = q.view(batch, seq, k_att, heads, head)
        key, value = (kv[n].view(batch, seq, heads, head) for n in ("k_proj", "v_proj"))
        logits = torch.einsum("bikhd,bjhd->bkhij", q, key) / math.sqrt(head)
        mask = (torch.tril(torch.ones(seq, seq)) == 0).expand_as(logits)
        z = torch.sigmoid(logits).masked_fill(mask, 0)
        log_beta = F.logsigmoid(-logits).masked_fill(mask, 0)
        re_cum_log_beta = torch.einsum("bnhij,jk->bnhik", log_beta, torch.tril(torch.ones(seq, seq), -1).double())
        y = torch.einsum("bkhij,bjhd->bikhd", z * re_cum_log_beta.exp(), value).reshape(-1, k_att, heads * head)
        y = torch.einsum("nka,nkad->nkd", y, sd[p + "attn.q_proj.output_experts.weight"][experts])
        out = torch.einsum("nkd,nk->nd", y + bias(p + "attn.q_proj.output_experts.bias", experts), gates)
        h = h + out.view(batch, seq, d)
        x = layer_norm(h, p + "ln_2").reshape(-1, d)
        gates, experts = gate(p + "mlpf.gate.w_gate.", x, k_mlp)
        hidden = torch.einsum("nd,nkdf->nkf", x, sd[p + "mlpf.experts.weight"][experts])
        hidden = F.gelu(hidden + bias(p + "mlpf.experts.bias", experts), approximate="tanh")
        y = torch.einsum("nkf,nkfd->nkd", hidden, sd[p + "mlpf.output_experts.weight"][experts])
        out = torch.einsum("nkd,nk->nd", y + bias(p + "mlpf.output_experts.bias", experts), gates)
        h = h + out.view(batch, seq, d)
    return layer_norm(h, "transformer.ln_f") @ sd["lm_head.weight"].T


def test_official_checkpoint_loaded_directly_is_refused_with_the_conversion_command(tmp_path):
    """The official config has our model type: loading it directly would give a random model and a warning."""
    official = {**MOLM_700M_8B, "vocab_size": 50, "n_embd": 16, "n_layer": 2, "ffd_hidden": 12, "gating_size": 6,
                "n_att_experts": 4, "n_mlp_experts": 5, "n_head": 2, "att_hidden": 8}  # fmt: skip
    src = tmp_path / "molm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(official))
    torch.save(official_checkpoint(official), src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"official ModuleFormer/MoLM checkpoint.*conversion.molm_to_moduleformer"):
        AutoModelForCausalLM.from_pretrained(src)


def test_official_checkpoint_that_does_not_fit_is_a_usage_error(tmp_path, capsys):
    """A source without config.json or weights, with a shard its index lists missing (or an index without its map),
    with weights of other sizes than its config says, a truncated weights file or a config field of the wrong type:
    a usage error naming the problem (tracebacks before), and nothing written."""
    from conversion.molm_to_moduleformer import main

    official = {**MOLM_700M_8B, "vocab_size": 50, "n_embd": 16, "n_layer": 2, "ffd_hidden": 12, "gating_size": 6,
                "n_att_experts": 4, "n_mlp_experts": 5, "n_head": 2, "att_hidden": 8}  # fmt: skip
    state = official_checkpoint(official)
    names = ("no_weights", "missing_shard", "other_sizes", "no_map", "truncated", "mistyped")
    sources = {name: tmp_path / name for name in names}
    for src in sources.values():
        src.mkdir()
        (src / "config.json").write_text(json.dumps(official))
    layer_1 = {k: v for k, v in state.items() if k.startswith("transformer.h.1.")}
    torch.save({k: v for k, v in state.items() if k not in layer_1}, sources["missing_shard"] / "pytorch_model-1.bin")
    index = {"weight_map": {k: "pytorch_model-2.bin" if k in layer_1 else "pytorch_model-1.bin" for k in state}}
    (sources["missing_shard"] / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (sources["other_sizes"] / "config.json").write_text(json.dumps({**official, "n_att_experts": 3}))
    torch.save(state, sources["other_sizes"] / "pytorch_model.bin")
    (sources["no_map"] / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    torch.save(state, sources["truncated"] / "pytorch_model.bin")
    weights = (sources["truncated"] / "pytorch_model.bin").read_bytes()
    (sources["truncated"] / "pytorch_model.bin").write_bytes(weights[: len(weights) // 2])
    (sources["mistyped"] / "config.json").write_text(json.dumps({**official, "n_layer": "two"}))
    cases = {
        tmp_path / "absent": "has no config.json",
        sources["no_weights"]: "has no model*.safetensors or pytorch_model*.bin weights",
        sources["missing_shard"]: "lacks the shard(s) ['pytorch_model-2.bin'] that pytorch_model.bin.index.json lists",
        sources["other_sizes"]: "disagree with config.json's sizes (n_att_experts, ",
        sources["no_map"]: 'model.safetensors.index.json has no "weight_map"',
        sources["truncated"]: "pytorch_model.bin could not be read as checkpoint weights (truncated",
        sources["mistyped"]: "config.json is not a valid MoLM config: ",
    }
    for src, message in cases.items():
        with pytest.raises(SystemExit):
            main(["--src", str(src), "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err, src
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [{"n_head": 1, "att_hidden": 16}, {"n_head": 2, "att_hidden": 8}], ids=["molm", "kv"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_checkpoint_converts_to_the_official_function(shape, fmt, tmp_path):
    from safetensors.torch import save_file

    from conversion.molm_to_moduleformer import convert, main

    official = {**MOLM_700M_8B, "vocab_size": 50, "n_embd": 16, "n_layer": 2, "ffd_hidden": 12, "gating_size": 6}
    official.update(n_att_experts=4, n_mlp_experts=5, bos_token_id=0, eos_token_id=0, torch_dtype="float32", **shape)
    state = official_checkpoint(official)
    src = tmp_path / "molm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(official))
    if fmt == "bin":
        torch.save(state, src / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, src / "model.safetensors")
    model = convert(src)
    ids = torch.randint(0, 50, (2, 7))
    expected = official_forward(state, official, ids)
    torch.testing.assert_close(model(ids).logits.double(), expected, atol=ATOL, rtol=0)
    main(["--src", str(src), "--out", str(tmp_path / "converted")])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_official_checkpoint_with_tied_head_converts_with_the_head_tied(tmp_path):
    """With `tie_word_embeddings`, a MoLM checkpoint stores no `lm_head.weight`: the converted head is the loaded
    embeddings (the model is built on the meta device, so an untied head would have no values to save)."""
    from conversion.molm_to_moduleformer import convert, main

    official = {**MOLM_700M_8B, "vocab_size": 50, "n_embd": 16, "n_layer": 2, "ffd_hidden": 12, "gating_size": 6}
    official.update(n_att_experts=4, n_mlp_experts=5, tie_word_embeddings=True, torch_dtype="float32")
    official.update(n_head=1, att_hidden=16)
    state = official_checkpoint(official)
    src = tmp_path / "molm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(official))
    torch.save({k: v for k, v in state.items() if k != "lm_head.weight"}, src / "pytorch_model.bin")
    model = convert(src)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 50, (2, 7))
    expected = official_forward({**state, "lm_head.weight": state["transformer.wte.weight"]}, official, ids)
    torch.testing.assert_close(model(ids).logits.double(), expected, atol=ATOL, rtol=0)
    main(["--src", str(src), "--out", str(tmp_path / "converted")])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


OFFICIAL_NAMES = {  # IBM/ModuleFormer 850f1eb: modeling_moduleformer.py, utils/moe.py, gate.py, parallel_experts.py
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ln_f.bias": "model.norm.bias",
    "transformer.h.0.ln_1.weight": "model.layers.0.input_layernorm.weight",
    "transformer.h.0.ln_1.bias": "model.layers.0.input_layernorm.bias",
    "transformer.h.11.ln_2.weight": "model.layers.11.post_attention_layernorm.weight",
    "transformer.h.11.ln_2.bias": "model.layers.11.post_attention_layernorm.bias",
    "transformer.h.0.attn.k_proj.weight": "model.layers.0.self_attn.k_proj.weight",
    "transformer.h.0.attn.k_proj.bias": "model.layers.0.self_attn.k_proj.bias",
    "transformer.h.3.attn.v_proj.weight": "model.layers.3.self_attn.v_proj.weight",
    "transformer.h.3.attn.v_proj.bias": "model.layers.3.self_attn.v_proj.bias",
    "transformer.h.0.attn.mask": None,  # buffers, not weights
    "transformer.h.0.attn.cum_weight": None,
    "lm_head.weight": "lm_head.weight",
}
for _official, _ours in (("attn.q_proj", "self_attn"), ("mlpf", "mlp")):  # the two MoEs of a block
    OFFICIAL_NAMES.update({
        f"transformer.h.0.{_official}.experts.weight": f"model.layers.0.{_ours}.input_proj",
        f"transformer.h.0.{_official}.experts.bias": f"model.layers.0.{_ours}.input_bias",
        f"transformer.h.0.{_official}.output_experts.weight": f"model.layers.0.{_ours}.output_proj",
        f"transformer.h.0.{_official}.output_experts.bias": f"model.layers.0.{_ours}.output_bias",
        f"transformer.h.0.{_official}.gate.w_gate.0.weight": f"model.layers.0.{_ours}.router.fc.weight",  # gate "mlp"
        f"transformer.h.0.{_official}.gate.w_gate.0.bias": f"model.layers.0.{_ours}.router.fc.bias",
        f"transformer.h.0.{_official}.gate.w_gate.3.weight": f"model.layers.0.{_ours}.router.out.weight",
    })  # fmt: skip


@pytest.mark.parametrize("official", list(OFFICIAL_NAMES))
def test_official_tensor_names_are_renamed_to_ours(official):
    """Every tensor name IBM's ModuleFormer code writes, renamed one to one (layer indices kept). The expert biases
    (`ParallelExperts(..., bias=True)`: `experts.bias` is the input projection's, `output_experts.bias` the output
    projection's) are not in the released MoLM checkpoints (bias=False) and so in no forward test without them: a
    swap of the two would go unnoticed there."""
    from conversion.molm_to_moduleformer import rename

    assert rename(official) == OFFICIAL_NAMES[official]


def test_the_linear_routers_weight_is_renamed_by_the_gate_type():
    """IBM's "linear" gate is `nn.Sequential(nn.Linear(d, E, bias=False))`: the same name `w_gate.0.weight` as the MLP
    gate's first layer, but it is the router's output map (ours: `router.out`)."""
    from conversion.molm_to_moduleformer import rename

    for official, ours in (("attn.q_proj", "self_attn"), ("mlpf", "mlp")):
        key = f"transformer.h.3.{official}.gate.w_gate.0.weight"
        assert rename(key, "linear") == f"model.layers.3.{ours}.router.out.weight"
        assert rename(key, "mlp") == f"model.layers.3.{ours}.router.fc.weight"


def test_an_unknown_official_tensor_name_is_refused():
    from conversion.molm_to_moduleformer import rename

    with pytest.raises(ValueError, match=r"unexpected tensor 'transformer.wpe.weight'.*not part of the ModuleFormer"):
        rename("transformer.wpe.weight")  # GPT-2's position table: ModuleFormer has none


def molm_source(tmp_path, **overrides) -> tuple[dict, dict]:
    """A tiny official MoLM checkpoint directory (config.json + pytorch_model.bin, float32): (config, state)."""
    official = {**MOLM_700M_8B, "vocab_size": 50, "n_embd": 16, "n_layer": 2, "ffd_hidden": 12, "gating_size": 6}
    official.update(n_att_experts=4, n_mlp_experts=5, n_head=2, att_hidden=8, bos_token_id=0, eos_token_id=0)
    official.update(torch_dtype="float32", **overrides)
    state = official_checkpoint(official)
    src = tmp_path / "molm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(official))
    torch.save(state, src / "pytorch_model.bin")
    return official, state


@pytest.mark.parametrize(
    "variant",
    [
        {"expert_bias": True},
        {"gate_type": "linear"},  # was refused: its Linear is `w_gate.0`, which took the MLP router's name
    ],
    ids=["expert_bias", "linear_gate"],
)
def test_official_checkpoint_variants_convert_to_the_official_function(variant, tmp_path):
    """The non-default official options: expert biases (`bias=True`: `expert_bias` in config.json, which our config
    reads) and the linear router (`gate_type` "linear"). The converted model computes the official forward (float64
    reference, fp32 model: ATOL as in the module docstring); the biases are ~0.3, so a swapped or dropped bias moves
    the logits by ~0.1, far above it."""
    from conversion.molm_to_moduleformer import convert

    official, state = molm_source(tmp_path, **variant)
    model = convert(tmp_path / "molm")
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(model(ids).logits.double(), official_forward(state, official, ids), atol=ATOL, rtol=0)


def test_official_checkpoint_dtype_option_casts_every_weight(tmp_path):
    """`--dtype bfloat16` (MoLM's own dtype) casts the float32 checkpoint: every floating parameter of the converted
    model is bf16, and the saved weights reload as bf16 with dtype="auto" (the saved config's dtype follows them)."""
    from conversion.molm_to_moduleformer import convert, main

    molm_source(tmp_path)
    model = convert(tmp_path / "molm", torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    main(["--src", str(tmp_path / "molm"), "--out", str(tmp_path / "converted"), "--dtype", "bfloat16"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype="auto")
    assert {p.dtype for p in reloaded.parameters() if p.is_floating_point()} == {torch.bfloat16}
    main(["--src", str(tmp_path / "molm"), "--out", str(tmp_path / "kept")])  # no --dtype: the checkpoint's own
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "kept", dtype="auto")
    assert {p.dtype for p in kept.parameters() if p.is_floating_point()} == {torch.float32}


# ------------------------------------------------------------------------------------------ GPT-2 seeding


def tiny_gpt2(**overrides):
    """A random GPT-2 whose every parameter is perturbed: GPT-2's own init makes every bias 0 and every LayerNorm
    (1, 0), so a bias or LayerNorm copied from the wrong place (or not at all) would not change the logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    config = GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                        **overrides)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("tie_word_embeddings", [True, False], ids=["tied-head", "untied-head"])
def test_exact_gpt2_seeding_reproduces_gpt2(tie_word_embeddings, tmp_path):
    from conversion.gpt2_to_moduleformer import main

    gpt2 = tiny_gpt2(tie_word_embeddings=tie_word_embeddings)
    gpt2.save_pretrained(tmp_path / "gpt2")
    main(["--gpt2", str(tmp_path / "gpt2"), "--out", str(tmp_path / "mf"), "--exact", "--num-experts", "4"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mf").eval()
    assert model.config.attention_function == "softmax" and model.config.num_experts == 4
    ids = torch.randint(3, 61, (2, 10))
    torch.testing.assert_close(model(ids).logits, gpt2(ids).logits, atol=ATOL, rtol=0)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, gpt2.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_exact_gpt2_seeding_is_transparent_to_left_padding():
    """Learned positions count real tokens (from the attention mask), as GPT-2's `generate` does."""
    from conversion.gpt2_to_moduleformer import convert

    model = convert(tiny_gpt2(), exact=True).eval()
    ids = torch.randint(3, 61, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = (padded != 0).long()
    mask[:, 3:] = 1
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits, atol=ATOL, rtol=0)


def test_gpt2_seeding_options():
    from conversion.gpt2_to_moduleformer import convert

    gpt2 = tiny_gpt2()
    sliced = convert(gpt2, slice_mlp=True, num_experts=4)
    assert sliced.config.attention_function == "stickbreaking" and sliced.config.position_embedding_type == "none"
    mlp, c_fc = sliced.model.layers[1].mlp, gpt2.transformer.h[1].mlp.c_fc
    torch.testing.assert_close(torch.cat(list(mlp.input_proj.unbind(0)), dim=1), c_fc.weight, atol=0, rtol=0)
    torch.testing.assert_close(mlp.input_bias.flatten(), c_fc.bias, atol=0, rtol=0)
    c_proj = gpt2.transformer.h[1].mlp.c_proj.weight  # [inner * 4, d]: expert e holds rows e * inner ...
    torch.testing.assert_close(torch.cat(list(mlp.output_proj.unbind(0)), dim=0), c_proj, atol=0, rtol=0)
    noisy = convert(gpt2, expert_noise=0.01)
    experts = noisy.model.layers[0].self_attn.input_proj
    assert not torch.equal(experts[0], experts[1])
    with pytest.raises(ValueError, match="exact=True"):
        convert(gpt2, exact=True, expert_noise=0.1)
    with pytest.raises(ValueError, match="divide"):
        convert(gpt2, slice_mlp=True, num_experts=5)
    fixed = r"\['hidden_size'\] follow the GPT-2 being converted \(\{'hidden_size': 32\}\)"
    with pytest.raises(ValueError, match=fixed):
        convert(gpt2, hidden_size=64)  # was a TypeError (a keyword given twice)


def test_gpt2_seeding_copies_every_tensor_to_its_place():
    """Every GPT-2 tensor lands where the module docstring says, biases and LayerNorms included, exactly. The exact
    conversion's logits cannot check the key bias: softmax is invariant to it (it adds q . b_k to every score of a
    query); stick-breaking, the default form checked here, is not."""
    from conversion.gpt2_to_moduleformer import convert

    gpt2 = tiny_gpt2()
    model = convert(gpt2, num_experts=3)
    d = 32
    source, target = gpt2.transformer, model.model
    assert torch.equal(target.embed_tokens.weight, source.wte.weight)
    assert torch.equal(target.norm.weight, source.ln_f.weight) and torch.equal(target.norm.bias, source.ln_f.bias)
    assert model.lm_head.weight is target.embed_tokens.weight
    for i, (block, layer) in enumerate(zip(source.h, target.layers)):
        w_qkv, b_qkv = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: [in, out], thirds q, k, v
        attn, mlp = layer.self_attn, layer.mlp
        pairs = {
            "ln_1.weight": (layer.input_layernorm.weight, block.ln_1.weight),
            "ln_1.bias": (layer.input_layernorm.bias, block.ln_1.bias),
            "ln_2.weight": (layer.post_attention_layernorm.weight, block.ln_2.weight),
            "ln_2.bias": (layer.post_attention_layernorm.bias, block.ln_2.bias),
            "k_proj.weight": (attn.k_proj.weight, w_qkv[:, d : 2 * d].T),
            "k_proj.bias": (attn.k_proj.bias, b_qkv[d : 2 * d]),
            "v_proj.weight": (attn.v_proj.weight, w_qkv[:, 2 * d :].T),
            "v_proj.bias": (attn.v_proj.bias, b_qkv[2 * d :]),
        }
        copies = {  # every expert a copy
            "attn.input_proj": (attn.input_proj, w_qkv[:, :d]),
            "attn.input_bias": (attn.input_bias, b_qkv[:d]),
            "attn.output_proj": (attn.output_proj, block.attn.c_proj.weight),
            "attn.output_bias": (attn.output_bias, block.attn.c_proj.bias),
            "mlp.input_proj": (mlp.input_proj, block.mlp.c_fc.weight),
            "mlp.input_bias": (mlp.input_bias, block.mlp.c_fc.bias),
            "mlp.output_proj": (mlp.output_proj, block.mlp.c_proj.weight),
            "mlp.output_bias": (mlp.output_bias, block.mlp.c_proj.bias),
        }
        for name, (ours, theirs) in pairs.items():
            assert torch.equal(ours, theirs), f"layer {i} {name}"
        for name, (experts, theirs) in copies.items():
            assert all(torch.equal(expert, theirs) for expert in experts), f"layer {i} {name}"
    assert source.h[0].attn.c_attn.bias.abs().min() > 0  # the fixture's biases are not GPT-2's zero init


def test_prune_then_extend_round_trips(tmp_path):
    model = tiny_model(num_experts=8)
    ids = torch.randint(3, 53, (1, 3))
    model.prune_experts(model.expert_usage([ids]), keep_top_n=3)
    assert model.config.mlp_experts_per_layer == [3, 3] and model.config.pruned_mlp_experts_per_layer == [5, 5]
    model.add_experts(1, freeze_existing=False)
    assert model.config.mlp_experts_per_layer == [4, 4] and model.config.attention_experts_per_layer == [4, 4]
    assert model.model.layers[0].mlp.router.out.weight.shape[0] == 4 + 5  # live experts, then pruned rows
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
