"""Numerical parity of our MoM (`modeling_mom`) with the official code (gzhch/Mixture-of-Modules) on identical weights.

    python -m tests.official.compare_mom --official PATH/TO/Mixture-of-Modules --official-python PYTHON

1. mom_official_runner.py runs under --official-python (an interpreter with torch and transformers 4.44): per case
   of its CASES and per dtype it saves the official weights, inputs and outputs (see its docstring);
2. the official weights are mapped one-to-one onto MoMForCausalLM and compared, every case in float32 and float64:
   eval logits (uncached; sdpa and eager attention), the routers' outputs of every round (routing probabilities
   of the softmax routers, raw scores of the others) and their top-K choices, training-mode CE, our aux_loss
   against the reference balancing loss (the official loss without its double softmax and top-1 counting) and,
   for K=1, against the official load_balancing_loss_func itself, the official aux loss as written against those
   two quirks applied to our router outputs, the total loss, every parameter gradient, and (H=1 cases) cached
   incremental decoding. Cases with the official depthwise_bal_loss=True run ours with router_aux_loss_per_round=True;
   there every balancing loss (reference, official as written, its reproduction) is aggregated per round, and the
   script also checks that the per-round and the pooled aggregations differ, so that these cases would catch either
   one being computed in place of the other.

Tolerances, relative to the reference tensor's max |value| (at least 1 for scalars and router outputs): float32
1e-5 (logits, router outputs, losses) and 1e-4 (each gradient tensor; the router gradients go through near-ties of
the softmax and several rounds); float64 1e-10 for everything, except 1e-6 where one side has an fp32 step in a
float64 run (transformers' CE takes `logits.float()`; the official balancing loss counts selections with
`expert_mask.float()`). --negative-control swaps two FFN modules in the mapping and exits 0 only if every case then
fails. Exit status 0 if every check passes, 1 otherwise.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.official.mom_official_runner import AUX_COEF, CASES, COMMON, aggregate_balancing, is_softmax_router

RUNNER = Path(__file__).with_name("mom_official_runner.py")
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-10)}
FP32_STEP_TOL = 1e-6  # float64 checks whose computation has an fp32 step on one side


class Report:
    def __init__(self):
        self.failed = []

    def result(self, label, ok, text):
        print(f"  {'ok  ' if ok else 'FAIL'} {label}: {text}")
        if not ok:
            self.failed.append(label)

    def check(self, label, ours, ref, tol):
        """max|ours - ref| <= tol * max|ref| (tensors) or tol * max(|ref|, 1) (scalars)."""
        ours, ref = torch.as_tensor(ours).detach().double(), torch.as_tensor(ref).detach().double()
        if ours.shape != ref.shape:
            return self.result(label, False, f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}")
        diff = (ours - ref).abs().max().item() if ours.numel() else 0.0
        scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-12)
        ok = diff <= tol * (max(scale, 1.0) if ref.dim() == 0 else scale)
        self.result(label, ok, f"max|diff|={diff:.3e} (max|ref|={scale:.3e}, rel={diff / scale:.2e})")


def our_config(case):
    from modeling_mom import MoMConfig

    return MoMConfig(
        vocab_size=COMMON["vocab_size"], max_position_embeddings=COMMON["n_positions"],
        hidden_size=COMMON["n_embd"], num_attention_heads=COMMON["n_head"], hidden_act="gelu_new",
        layer_norm_epsilon=1e-5, embd_dropout=0.0, resid_dropout=0.0, attention_dropout=0.0,
        num_bottom_layers=case["b"], num_top_layers=case["t"], num_chunks=case["chunks"],
        num_attention_modules=case["N_A"], num_ffn_modules=case["N_F"], num_rounds=case["H"],
        num_modules_per_tok=case["K"], use_anchor_layers=case["anchor"], enable_skip=case["skip"],
        router_type="gru" if case["router_type"].startswith("gru") else "mlp",
        router_hidden_size=COMMON["router_dim"], router_temperature=case["tau"],
        router_weighting=("probability" if case.get("all_paths") else "renormalize") if is_softmax_router(case)
        else "score",
        routing_mode="all_modules" if case.get("all_paths") else "learned", router_aux_loss_coef=AUX_COEF,
        output_router_logits=True, router_aux_loss_per_round=case.get("depthwise", False),
        weighted_qkv=case.get("weighted_qkv", False), sign_router_weights=case.get("ste", False),
        bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=True,
    )


def routed_layers(case):
    routed = [False] * case["b"]
    for _ in range(case["chunks"]):
        routed += [True] + [False] * int(case["anchor"])
    return routed + [False] * case["t"]


POOLS = {
    "attention": ("mot_attn", [("norm.weight", "attention_layernorm", "weight"),
                               ("norm.bias", "attention_layernorm", "bias"), ("qkv_proj", "c_attn", "weight"),
                               ("qkv_bias", "c_attn", "bias"), ("out_proj", "c_proj", "weight"),
                               ("out_bias", "c_proj", "bias")]),
    "mlp": ("mot_ffn", [("norm.weight", "ffn_layernorm", "weight"), ("norm.bias", "ffn_layernorm", "bias"),
                        ("up_proj", "c_fc", "weight"), ("up_bias", "c_fc", "bias"),
                        ("down_proj", "c_proj", "weight"), ("down_bias", "c_proj", "bias")]),
}
# ours <- official router tensors. TokenRouter: Sequential(Linear, ReLU, Linear); GRUTokenRouter: x2h / h2h with
# chunks (r, z, n), nn.GRUCell's (weight_ih, weight_hh) layout, and a read-out Linear `router`
ROUTER_TENSORS = {
    "mlp": {"fc.weight": "router.0.weight", "fc.bias": "router.0.bias", "out.weight": "router.2.weight",
            "out.bias": "router.2.bias"},
    "gru": {"cell.weight_ih": "x2h.weight", "cell.bias_ih": "x2h.bias", "cell.weight_hh": "h2h.weight",
            "cell.bias_hh": "h2h.bias", "out.weight": "router.weight", "out.bias": "router.bias"},
}


def map_official(sd, case, attn_live):
    """Official `transformer.h.{i}...` tensors -> our `model.layers.{i}...` tensors (Conv1D [in, out] layout kept;
    pool tensors stacked over the ModuleList index; dead attention-router classes dropped). Every official tensor
    but the tied lm_head must be used."""
    used, out = set(), {}

    def take(key):
        used.add(key)
        return sd[key]

    out["model.embed_tokens.weight"] = take("transformer.wte.weight")
    out["model.embed_positions.weight"] = take("transformer.wpe.weight")
    out["model.norm.weight"] = take("transformer.ln_f.weight")
    out["model.norm.bias"] = take("transformer.ln_f.bias")
    router_kind = "gru" if case["router_type"].startswith("gru") else "mlp"
    for i, routed in enumerate(routed_layers(case)):
        o, t = f"transformer.h.{i}", f"model.layers.{i}"
        for ours_pool, (off_pool, names) in POOLS.items():
            n_mod = (case["N_A"] if ours_pool == "attention" else case["N_F"]) if routed else 1
            for ours_name, off_mod, kind in names:
                keys = [f"{o}.{off_pool}.{off_mod}.{j}.{kind}" for j in range(n_mod)] if routed else [
                    f"{o}.{off_pool}.{off_mod}.{kind}"]
                out[f"{t}.{ours_pool}.{ours_name}"] = torch.stack([take(k) for k in keys])
        if routed:
            for ours_r, off_pool in (("attention_router", "mot_attn"), ("mlp_router", "mot_ffn")):
                for ours_name, off_name in ROUTER_TENSORS[router_kind].items():
                    tensor = take(f"{o}.{off_pool}.router.{off_name}")
                    live = attn_live if ours_r == "attention_router" and ours_name.startswith("out") else slice(None)
                    out[f"{t}.{ours_r}.{ours_name}"] = tensor[live]
    unused = set(sd) - used - {"lm_head.weight"}
    assert not unused, f"official tensors not mapped: {sorted(unused)}"
    return out


def build_ours(case, res, attn_impl, dtype, negative_control):
    from modeling_mom import MoMForCausalLM

    config = our_config(case)
    config._attn_implementation = attn_impl
    model = MoMForCausalLM(config)
    mapped = map_official(res["state_dict"], case, res["attn_live"])
    if negative_control:  # deliberately wrong mapping: swap FFN modules 0 and 1 of the first chunk
        for key in [k for k in mapped if k.startswith(f"model.layers.{case['b']}.mlp.")]:
            mapped[key] = mapped[key][[1, 0] + list(range(2, mapped[key].shape[0]))]
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    return model.to(dtype)


def check_routing(rep, case, res, router_logits, real, tol):
    """Our routers' outputs of every round vs the official ones, and identical top-K choices (real tokens only)."""
    softmax = is_softmax_router(case)
    ours = [F.softmax(x.double(), -1) if softmax else x.double() for x in router_logits]
    ref = [x.reshape(-1, x.shape[-1])[:, live].double()
           for a, f in res["eval_routing"] for x, live in ((a, res["attn_live"]), (f, slice(None)))]
    assert len(ours) == len(ref), (len(ours), len(ref))
    rows = real.reshape(-1)
    worst = max((p[rows] - q[rows]).abs().max().item() for p, q in zip(ours, ref))
    scale = max(max(q[rows].abs().max().item() for q in ref), 1.0)
    same = all(torch.equal(p[rows].topk(case["K"]).indices.sort(-1).values,
                           q[rows].topk(case["K"]).indices.sort(-1).values) for p, q in zip(ours, ref))
    what = "routing probs" if softmax else "raw router scores"
    rep.result(f"{what}, {len(ours)} router calls", worst <= tol * scale and same,
               f"max|diff|={worst:.3e} (max|ref|={scale:.3e}); identical top-{case['K']} choices: {same}")


def check_gradients(rep, model, ref_grads, grad_tol):
    worst_rel, worst_name, n_zero = 0.0, "", 0
    for name, p in model.named_parameters():
        g_ref = ref_grads[name].double()
        g = p.grad.double() if p.grad is not None else torch.zeros_like(g_ref)
        diff, scale = (g - g_ref).abs().max().item(), g_ref.abs().max().item()
        if scale == 0.0:
            n_zero += 1
            if diff != 0.0:
                rep.result(f"grad {name}", False, f"official grad is 0, ours max|g|={diff:.3e}")
            continue
        if diff / scale > grad_tol:
            rep.result(f"grad {name}", False, f"max|diff|={diff:.3e} max|ref|={scale:.3e} rel={diff / scale:.2e}")
        if diff / scale > worst_rel:
            worst_rel, worst_name = diff / scale, name
    rep.result(f"gradients of {len(ref_grads)} tensors ({n_zero} exactly 0 on both sides)", worst_rel <= grad_tol,
               f"worst rel diff {worst_rel:.2e} ({worst_name}; tol {grad_tol:g})")


def official_aux_as_written(case, router_logits, mask):
    """The official balancing loss reproduced from our router outputs (attention and FFN routers alternate in
    `router_logits`): the official load_balancing_loss_func applies a softmax to what it is given (a second one to
    the probabilities of softmax routers, the only one to raw scores) and counts the top-1 choice only; aggregated
    over the rounds as the case's depthwise_bal_loss says (`aggregate_balancing`)."""
    from modeling_mom.routing_losses import switch_load_balancing_loss

    inputs = [F.softmax(x, -1) if is_softmax_router(case) else x for x in router_logits]
    return aggregate_balancing(case, [inputs[0::2], inputs[1::2]],
                               lambda calls, _: switch_load_balancing_loss(calls, 1, mask))


def check_aggregations_differ(rep, case, router_logits, mask, aux_loss, official_as_written):
    """Per-round cases only: the pooled aggregation of the same router outputs must differ from the per-round one
    by more than 100x the fp32 tolerance, both for our loss and for the official loss as written, so that a pooled
    loss computed in place of the per-round one (or the reverse) would fail the loss checks."""
    from modeling_mom.routing_losses import switch_load_balancing_loss

    pooled = dict(case, depthwise=False)
    ours_pooled = aggregate_balancing(pooled, [router_logits[0::2], router_logits[1::2]],
                                      lambda calls, _: switch_load_balancing_loss(calls, case["K"], mask))
    official_pooled = official_aux_as_written(pooled, router_logits, mask)
    rel = [abs(a.item() - b.item()) / abs(b.item()) for a, b in ((ours_pooled, aux_loss),
                                                                   (official_pooled, official_as_written))]
    rep.result("per-round vs pooled aggregation differ (rel > 1e-3)", min(rel) > 1e-3,
               f"ours {aux_loss.item():.6f} per round vs {ours_pooled.item():.6f} pooled (rel {rel[0]:.2e}); "
               f"official as written {official_as_written.item():.6f} vs pooled {official_pooled.item():.6f} "
               f"(rel {rel[1]:.2e})")


def check_train(rep, case, res, dtype, tol, grad_tol, negative_control):
    """Training mode (dropout 0): logits, CE, aux loss, total loss, gradients."""
    ids, mask, pos, labels = res["ids"], res["mask"], res["pos"], res["labels"]
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    fp32_step_tol = tol if dtype == torch.float32 else FP32_STEP_TOL
    model = build_ours(case, res, "sdpa", dtype, negative_control).train()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False,
                output_router_logits=True)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
    rep.check("train logits", out.logits[real], res["train_logits"][real], tol)
    rep.check("train CE (LM loss)", ce, res["train_ce"], tol)
    rep.check("train aux_loss vs reference (softmax once, all K counted)", out.aux_loss, res["train_aux_fixed"], tol)
    if case["K"] == 1 and not case.get("dead_attn_class"):
        what = "log p" if is_softmax_router(case) else "raw scores = official aux as written"
        rep.check(f"train aux_loss vs official load_balancing_loss_func({what})", out.aux_loss,
                  res["train_aux_official_on_logits"], fp32_step_tol)
        if not is_softmax_router(case):
            rep.check("train aux_loss vs the official aux_loss as written (the model's own output)", out.aux_loss,
                      res["train_aux_official"], fp32_step_tol)
    rep.check("train loss = CE + 0.01 aux", out.loss, res["train_J"], fp32_step_tol)
    if not case.get("dead_attn_class"):
        rep.check("official aux_loss as written vs its two quirks applied to our router outputs",
                  official_aux_as_written(case, out.router_logits, mask), res["train_aux_official"], fp32_step_tol)
    if case.get("depthwise"):
        with torch.no_grad():
            check_aggregations_differ(rep, case, out.router_logits, mask, out.aux_loss, res["train_aux_official"])
    print(f"  info official aux_loss as written ({'double softmax, ' if is_softmax_router(case) else ''}"
          f"top-1 counted): {res['train_aux_official'].item():.6f} vs ours {out.aux_loss.item():.6f}")
    # fp32: backward of the model's own training loss; float64: of CE (in float64) + coef * aux, the same function
    (out.loss if dtype == torch.float32 else ce + AUX_COEF * out.aux_loss).backward()
    check_gradients(rep, model, map_official(res["grads"], case, res["attn_live"]), grad_tol)


@torch.no_grad()
def check_cached_decoding(rep, case, res, dtype, tol, negative_control):
    """Our cached incremental decoding vs the official cached one (H=1 only, where the official cache is right)."""
    from modeling_mom.shared_modeling import CACHE_FIELD

    model = build_ours(case, res, "sdpa", dtype, negative_control).eval()
    ids, prefix = res["ids"], case["cached_prefix"]
    out = model(input_ids=ids[:, :prefix], use_cache=True)
    steps = [out.logits]
    for i in range(prefix, ids.shape[1]):
        out = model(input_ids=ids[:, i:i + 1], cache=getattr(out, CACHE_FIELD), use_cache=True)
        steps.append(out.logits)
    rep.check("cached decoding logits vs official cached", torch.cat(steps, 1), res["cached_logits"], tol)
    rep.check("official cached vs official uncached (sanity)", res["cached_logits"], res["eval_logits"], tol)


def run_case(rep, case, res, dtype, negative_control):
    tol, grad_tol = TOL[dtype]
    print(f"== {case['name']} [{str(dtype)[6:]}]: {case['router_type']} K={case['K']} b={case['b']} t={case['t']} "
          f"chunks={case['chunks']} anchor={case['anchor']} N_A={case['N_A']} N_F={case['N_F']} H={case['H']} "
          f"SKIP={case['skip']} tau={case['tau']} pad={case.get('left_pad')} "
          f"depthwise_bal_loss={case.get('depthwise', False)}; min routing margin (logit units) "
          f"{res['min_margin']:.1e}")
    ids, mask, pos = res["ids"], res["mask"], res["pos"]
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    for impl in ("sdpa", "eager"):
        model = build_ours(case, res, impl, dtype, negative_control).eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                        output_router_logits=True)
        rep.check(f"eval logits [{impl}]", out.logits[real], res["eval_logits"][real], tol)
        if impl == "sdpa":
            check_routing(rep, case, res, out.router_logits, real, tol)
    usage = [[sum(u[pool][c] for u in res["usage"]) for c in range(len(res["usage"][0][pool]))] for pool in (0, 1)]
    print(f"  info official top-{case['K']} picks summed over rounds (last = SKIP if on): attention {usage[0]}, "
          f"FFN {usage[1]}")
    check_train(rep, case, res, dtype, tol, grad_tol, negative_control)
    if case.get("cached_prefix"):
        check_cached_decoding(rep, case, res, dtype, tol, negative_control)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="gzhch/Mixture-of-Modules checkout (contains mom/model.py)")
    ap.add_argument("--official-python", required=True, help="interpreter with torch and transformers 4.44.2")
    ap.add_argument("--workdir", help="keep the official outputs here (default: a temporary folder)")
    ap.add_argument("--negative-control", action="store_true",
                    help="swap two FFN modules in the mapping; exit 0 only if every case then FAILS")
    args = ap.parse_args()
    torch.set_num_threads(1)
    failed_cases = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        subprocess.run([args.official_python, str(RUNNER), "--official", args.official, "--out", str(work)],
                       check=True)
        for dtype in (torch.float32, torch.float64):
            for case in CASES:
                name = f"{case['name']}_{str(dtype)[6:]}"
                rep = Report()
                run_case(rep, case, torch.load(work / f"{name}.pt", weights_only=False), dtype, args.negative_control)
                if rep.failed:
                    failed_cases.append(name)
    all_cases = len(CASES) * len(TOL)
    if args.negative_control:
        ok = len(failed_cases) == all_cases
        print(f"\nnegative control: {len(failed_cases)}/{all_cases} cases FAILED"
              f" ({'as they must' if ok else 'some were NOT caught'})")
    else:
        ok = not failed_cases
        print(f"\n{'ALL OK' if ok else 'FAILED: ' + ', '.join(failed_cases)} ({all_cases} cases)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
