"""Official side of the MoM parity check (compare_mom.py runs it in the official environment), and the test cases.

    OFFICIAL_PYTHON mom_official_runner.py --official PATH/TO/Mixture-of-Modules --out DIR

Imports only torch, transformers 4.x and the gzhch/Mixture-of-Modules checkout given by --official (mom/model.py,
mom/config.py, mom/utils.py). No official file is edited; one import shim: model.py does
`from .configuration_gpt_mot import GPT2Config` but the file is mom/config.py, so mom.config is registered under the
missing name before mom.model is imported. For each case of CASES and each dtype (float32, float64) it builds the
official GPT2MoTLMHeadModel from a seed, perturbs its weights to O(1) values (`perturb`), and saves to
DIR/<case>_<dtype>.pt the weights, inputs, eval logits, the routers' outputs of every round, training-mode CE, the
official aux loss as written, the reference balancing loss (`aux_switch`, aggregated as the case's
`depthwise_bal_loss` says: see `aggregate_balancing`), all gradients of CE + coef * reference loss, and (H=1 cases)
cached decoding logits.
"""

import argparse
import math
import os
import sys

import torch

COMMON = dict(vocab_size=97, n_positions=32, n_embd=64, n_head=4, router_dim=32, batch=2, seq=16)
AUX_COEF = 0.01
# Official hyper-parameters: router_type, K = routing_top_k, b / t = bottom / top plain layers, chunks, anchor =
# require_anchor_layer, N_A / N_F = num_attn / num_ffn, H = depth_per_chunk, skip = enable_pause, tau =
# router_softmax_temperature. Routers with "softmax" are our router_weighting="renormalize", those without "score".
# dead_attn_class: the official GRU router sizes both routers max(N_A, N_F) + SKIP; with N_A < N_F the attention
# router's extra classes select nothing, and are given a -1e4 bias and zero weights (probability exactly 0), which
# makes the two models the same function. cached_prefix: only with H=1 is the official KV cache right (one past per
# block), so cached decoding is compared there. depthwise: the official depthwise_bal_loss (ours:
# router_aux_loss_per_round), the balancing loss computed per round and averaged over all rounds of all chunks.
CASES = [
    dict(name="mlp_k1", router_type="naive_softmax", K=1, b=1, t=1, chunks=2, anchor=True, N_A=4, N_F=4, H=3,
         skip=True, tau=0.5, seed=11),
    dict(name="mlp_k2", router_type="naive_softmax", K=2, b=1, t=1, chunks=1, anchor=True, N_A=3, N_F=3, H=4,
         skip=True, tau=0.5, seed=12),
    dict(name="mlp_k2_noskip", router_type="naive_softmax", K=2, b=1, t=0, chunks=2, anchor=False, N_A=4, N_F=4,
         H=2, skip=False, tau=1.0, seed=13),
    dict(name="gru_k1", router_type="gru_softmax", K=1, b=1, t=1, chunks=2, anchor=True, N_A=4, N_F=4, H=3,
         skip=True, tau=0.5, seed=21),
    dict(name="gru_k2", router_type="gru_softmax", K=2, b=1, t=1, chunks=1, anchor=False, N_A=4, N_F=4, H=5,
         skip=True, tau=0.2, seed=22),
    dict(name="gru_k2_pad", router_type="gru_softmax", K=2, b=1, t=1, chunks=1, anchor=True, N_A=4, N_F=4, H=3,
         skip=True, tau=0.5, seed=23, left_pad=(0, 5)),
    dict(name="gru_k2_attn3_ffn4", router_type="gru_softmax", K=2, b=1, t=1, chunks=1, anchor=True, N_A=3, N_F=4,
         H=3, skip=True, tau=0.5, seed=24, dead_attn_class=True),
    dict(name="mlp_k1_h1_cached", router_type="naive_softmax", K=1, b=1, t=1, chunks=2, anchor=True, N_A=4, N_F=4,
         H=1, skip=True, tau=0.5, seed=31, cached_prefix=10),
    # routers without softmax: the top-K raw scores weight the modules (ours: router_weighting="score")
    dict(name="naive_k1_score", router_type="naive", K=1, b=1, t=1, chunks=2, anchor=True, N_A=4, N_F=4, H=3,
         skip=True, tau=1.0, seed=41),
    dict(name="naive_k2_score_h1_cached", router_type="naive", K=2, b=1, t=1, chunks=2, anchor=False, N_A=3, N_F=3,
         H=1, skip=True, tau=1.0, seed=42, cached_prefix=10),
    dict(name="gru_k1_score_pad", router_type="gru", K=1, b=1, t=1, chunks=1, anchor=True, N_A=4, N_F=4, H=3,
         skip=True, tau=1.0, seed=43, left_pad=(0, 5)),
    dict(name="gru_k2_score", router_type="gru", K=2, b=1, t=1, chunks=2, anchor=True, N_A=4, N_F=4, H=3,
         skip=True, tau=1.0, seed=44),
    # depthwise_bal_loss=True (ours: router_aux_loss_per_round=True)
    dict(name="naive_k1_score_depthwise_pad", router_type="naive", K=1, b=1, t=1, chunks=2, anchor=True, N_A=4,
         N_F=4, H=3, skip=True, tau=1.0, seed=51, left_pad=(0, 5), depthwise=True),
    dict(name="gru_k2_depthwise", router_type="gru_softmax", K=2, b=1, t=1, chunks=2, anchor=True, N_A=4, N_F=4,
         H=3, skip=True, tau=0.5, seed=52, depthwise=True),
    dict(name="mlp_k2_depthwise_pad", router_type="naive_softmax", K=2, b=1, t=1, chunks=1, anchor=False, N_A=3,
         N_F=3, H=4, skip=True, tau=0.5, seed=53, left_pad=(0, 5), depthwise=True),
    # the ablation switches weighted_qkv, use_ste (ours: sign_router_weights) and routing_all_possible_path (ours:
    # routing_mode="all_modules", with router_weighting "probability" for softmax routers, else "score")
    dict(name="gru_k2_weighted_qkv", router_type="gru_softmax", K=2, b=1, t=1, chunks=1, anchor=True, N_A=4, N_F=4,
         H=3, skip=True, tau=0.5, seed=61, weighted_qkv=True),
    dict(name="naive_k2_score_ste_weighted_qkv", router_type="naive", K=2, b=1, t=1, chunks=2, anchor=True, N_A=3,
         N_F=3, H=2, skip=True, tau=1.0, seed=62, ste=True, weighted_qkv=True),
    dict(name="mlp_all_paths_weighted_qkv_pad", router_type="naive_softmax", K=1, b=1, t=1, chunks=1, anchor=True,
         N_A=4, N_F=4, H=3, skip=True, tau=0.5, seed=63, left_pad=(0, 5), all_paths=True, weighted_qkv=True),
    dict(name="gru_all_paths_score_ste_h1_cached", router_type="gru", K=2, b=1, t=1, chunks=2, anchor=False, N_A=3,
         N_F=3, H=1, skip=True, tau=1.0, seed=64, cached_prefix=10, all_paths=True, ste=True),
]


def is_softmax_router(case):
    return "softmax" in case["router_type"]


def aggregate_balancing(case, pools, loss_fn):
    """The official aggregation of a balancing loss (model.py, GPT2MoTLMHeadModel.forward, l.1407-1448).

    `pools` = [attention router outputs, FFN router outputs], one tensor per round of every chunk, in order;
    `loss_fn(calls, pool)` is the loss of the given router calls pooled. depthwise_bal_loss=False: one loss per pool
    over all its calls, attention's + FFN's. True: per round, its attention loss + its FFN loss, summed over the
    rounds and divided by their number (`len(routing_scores)`, all rounds of all chunks)."""
    if not case.get("depthwise"):
        return sum(loss_fn(calls, i) for i, calls in enumerate(pools))
    n_rounds = len(pools[0])
    return sum(loss_fn([calls[r]], i) for r in range(n_rounds) for i, calls in enumerate(pools)) / n_rounds


def import_official(path):
    sys.path.insert(0, os.path.abspath(path))
    import mom.config as official_config

    sys.modules["mom.configuration_gpt_mot"] = official_config  # the module name model.py imports
    import mom.model as official_model
    import mom.utils as official_utils

    return official_config, official_model, official_utils


def official_config(mod, case):
    n_blocks = case["b"] + case["t"] + case["chunks"] * (1 + int(case["anchor"]))
    return mod.GPT2Config(
        vocab_size=COMMON["vocab_size"], n_positions=COMMON["n_positions"], n_embd=COMMON["n_embd"],
        n_layer=n_blocks, n_head=COMMON["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
        chunks=case["chunks"], num_bottom_layers=case["b"], num_top_layers=case["t"],
        num_attn=case["N_A"], num_ffn=case["N_F"], depth_per_chunk=case["H"],
        router_type=case["router_type"], router_dim=COMMON["router_dim"],
        router_softmax_temperature=case["tau"], enable_pause=case["skip"], require_anchor_layer=case["anchor"],
        routing_top_k=case["K"], output_router_logits=True, router_aux_loss_coef=AUX_COEF,
        depthwise_bal_loss=case.get("depthwise", False), weighted_qkv=case.get("weighted_qkv", False),
        routing_all_possible_path=case.get("all_paths", False), use_ste=case.get("ste", False),
    )


@torch.no_grad()
def perturb(model, seed):
    """Replace the (mostly zero/one/tiny) default init by O(1) random values so that every bias, LayerNorm gain
    and router weight matters and routing decisions are far from ties."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)

    def rn(shape, std):
        return torch.randn(shape, generator=g) * std

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(1 + rn(m.weight.shape, 0.2))
            m.bias.copy_(rn(m.bias.shape, 0.1))
        elif isinstance(m, torch.nn.Embedding):
            m.weight.copy_(rn(m.weight.shape, 0.5))
        elif isinstance(m, Conv1D):
            m.weight.copy_(rn(m.weight.shape, 0.7 / math.sqrt(m.weight.shape[0])))
            m.bias.copy_(rn(m.bias.shape, 0.05))
        elif isinstance(m, torch.nn.Linear) and "router" in name:
            m.weight.copy_(rn(m.weight.shape, 1.5 / math.sqrt(m.weight.shape[1])))
            if m.bias is not None:
                m.bias.copy_(rn(m.bias.shape, 0.3))


def routing_probs(case, scores):
    """The routing probabilities of one router output: the official softmax routers return them; the raw scores of
    the others go through one softmax (which is what the official balancing loss applies to them)."""
    return scores if is_softmax_router(case) else torch.softmax(scores, dim=-1)


def aux_switch(prob_list, k, mask, live):
    """Switch balancing loss C * sum_i f_i P_i computed ONCE on the routing probabilities (no second softmax),
    counting all K selections (f sums to 1), padding excluded, dead classes (live=False) dropped: the official loss
    with its double softmax and top-1 counting removed; the reference for our aux_loss."""
    p = torch.cat([x.reshape(-1, x.shape[-1]) for x in prob_list])[:, live]
    w = torch.ones(p.shape[0], dtype=p.dtype) if mask is None else mask.reshape(-1).to(p.dtype).repeat(len(prob_list))
    chosen = torch.zeros_like(p).scatter_(1, p.topk(k, dim=-1).indices, 1.0)
    f = (chosen * w[:, None]).sum(0) / (w.sum() * k)
    P = (p * w[:, None]).sum(0) / w.sum()
    return p.shape[-1] * (f * P).sum()


def make_inputs(case):
    g = torch.Generator().manual_seed(case["seed"] + 2000)
    B, T = COMMON["batch"], COMMON["seq"]
    ids = torch.randint(0, COMMON["vocab_size"], (B, T), generator=g)
    mask = pos = None
    labels = ids.clone()
    if case.get("left_pad"):
        mask = torch.ones(B, T, dtype=torch.long)
        for row, n in enumerate(case["left_pad"]):
            mask[row, :n] = 0
            # pads, and the first real token: its label is predicted from a pad position's logits, which are
            # arbitrary (and differ between the two codes); the loss then reads real positions only
            labels[row, : n + 1] = -100
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, labels


def min_margin(case, routing, mask, attn_live):
    """Smallest gap between the K-th and (K+1)-th choice, in logit units (log-probabilities for softmax routers,
    raw scores otherwise): small margins mean a risk of round-off flips."""
    margins = []
    for a, f in routing:
        for p, live in ((a, attn_live), (f, torch.ones(f.shape[-1], dtype=torch.bool))):
            p = p.reshape(-1, p.shape[-1])[:, live]
            if mask is not None:
                p = p[mask.reshape(-1).bool()]
            if p.shape[-1] > case["K"]:
                top = p.topk(case["K"] + 1, dim=-1).values
                top = top.log() if is_softmax_router(case) else top
                margins.append((top[:, -2] - top[:, -1]).min().item())
    return min(margins) if margins else float("nan")


def train_record(case, model, utils_mod, ids, mask, pos, labels, attn_live):
    """Training mode (dropout 0): CE, official aux as written, reference aux, gradients of CE + coef * reference."""
    model.train()
    model.zero_grad()
    out = model(ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False,
                output_router_logits=True)
    pools = [[r[i] for r in out.routing_scores] for i in (0, 1)]
    lives = (attn_live, torch.ones(pools[1][0].shape[-1], dtype=torch.bool))
    aux_fixed = aggregate_balancing(case, pools, lambda calls, i: aux_switch(
        [routing_probs(case, x) for x in calls], case["K"], mask, lives[i]))
    with torch.no_grad():  # official load_balancing_loss_func on logits: log p (softmax routers) or the raw scores
        aux_on_logits = aggregate_balancing(case, pools, lambda calls, i: utils_mod.load_balancing_loss_func(
            tuple((x.log() if is_softmax_router(case) else x).reshape(-1, x.shape[-1]) for x in calls),
            calls[0].shape[-1], mask))
    J = out.loss + AUX_COEF * aux_fixed
    J.backward()
    return dict(train_ce=out.loss.detach(), train_aux_official=out.aux_loss.detach(),
                train_aux_fixed=aux_fixed.detach(), train_aux_official_on_logits=aux_on_logits, train_J=J.detach(),
                train_logits=out.logits.detach(),
                grads={n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                       for n, p in model.named_parameters()})


@torch.no_grad()
def cached_logits(model, ids, prefix):
    o = model(ids[:, :prefix], use_cache=True, output_router_logits=False)
    steps = [o.logits]
    for i in range(prefix, ids.shape[1]):
        o = model(ids[:, i:i + 1], past_key_values=o.past_key_values, use_cache=True, output_router_logits=False)
        steps.append(o.logits)
    return torch.cat(steps, dim=1)


def run_case(mods, case, dtype):
    cfg_mod, model_mod, utils_mod = mods
    torch.manual_seed(case["seed"])
    model = model_mod.GPT2MoTLMHeadModel(official_config(cfg_mod, case))
    perturb(model, case["seed"] + 1000)
    model.to(dtype)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    assert model.config.depthwise_bal_loss == case.get("depthwise", False)
    attn_live = torch.ones(max(case["N_A"], case["N_F"]) + int(case["skip"]), dtype=torch.bool)
    if case.get("dead_attn_class"):
        attn_live[case["N_A"]:case["N_F"]] = False
        with torch.no_grad():
            for blk in model.transformer.h:
                if isinstance(blk, model_mod.MoTBlock):
                    out = blk.mot_attn.router.router  # GRUTokenRouter read-out Linear(router_dim, C)
                    out.weight[case["N_A"]:case["N_F"]] = 0.0
                    out.bias[case["N_A"]:case["N_F"]] = -1e4
    ids, mask, pos, labels = make_inputs(case)
    res = dict(case=case, ids=ids, mask=mask, pos=pos, labels=labels, attn_live=attn_live,
               state_dict={k: v.clone() for k, v in model.state_dict().items()})

    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False, output_router_logits=True)
    res["eval_logits"] = out.logits
    res["eval_routing"] = [(a.clone(), f.clone()) for a, f in out.routing_scores]
    res["min_margin"] = min_margin(case, res["eval_routing"], mask, attn_live)
    # how often SKIP (last) and each module were picked, to show that the case exercises them
    res["usage"] = [[torch.bincount(x.reshape(-1, x.shape[-1]).topk(case["K"]).indices.reshape(-1),
                                    minlength=x.shape[-1]).tolist() for x in pair] for pair in res["eval_routing"]]
    res.update(train_record(case, model, utils_mod, ids, mask, pos, labels, attn_live))
    if case.get("cached_prefix"):
        model.eval()
        res["cached_logits"] = cached_logits(model, ids, case["cached_prefix"])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="official checkout (contains mom/model.py)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    mods = import_official(args.official)
    os.makedirs(args.out, exist_ok=True)
    for dtype in (torch.float32, torch.float64):
        for case in CASES:
            res = run_case(mods, case, dtype)
            torch.save(res, os.path.join(args.out, f"{case['name']}_{str(dtype)[6:]}.pt"))
            print(f"official {case['name']} {str(dtype)[6:]}: CE={res['train_ce']:.6f} "
                  f"aux_official={res['train_aux_official']:.6f} aux_fixed={res['train_aux_fixed']:.6f} "
                  f"min_margin={res['min_margin']:.2e}")


if __name__ == "__main__":
    main()
