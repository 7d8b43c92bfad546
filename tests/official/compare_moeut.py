"""Numerical parity of our MoEUT (`modeling_mom`) with the official code (RobertCsordas/moeut) on identical weights.

    python -m tests.official.compare_moeut --official PATH/TO/moeut

Both models run in this interpreter: the official package `moeut` is imported from --official. For each configuration
the official `MoEUTLM` is built from a seed, its parameters are copied one-to-one into `MoEUTForCausalLM`, and eval
logits, our KV-cached decoding, the training-mode LM loss, entropy regulariser, total loss and gradients are compared.

The official CVMM kernel is Triton-only (no CPU path), so:
  * if `triton` is not importable, a stub `triton` module stands in while `moeut/cvmm.py` is imported (its kernels
    are never called);
  * `cvmm_kernel_ref` / `cvmm_backward_ref` below restate the two Triton kernels in plain PyTorch (cvmm.py:
    `cvmm_kernel` + `cvmm_triton`, lines 62-194 and 355-400; `cvmm_backward_kernel3` + `cvmm_triton_backward`,
    lines 195-350 and 421-458), and every check runs twice: (1) "autograd": `moeut.moeut.cvmm` rebound to a
    restatement of `CVMM.forward` (lines 464-489) on the kernel restatement, differentiated by autograd; (2)
    "official-CVMM-backward": the official `CVMM` autograd.Function with its own backward, only its two kernel
    calls replaced, `torch.Tensor.cuda` a no-op meanwhile (CVMM builds `torch.tensor(-1).cuda()` markers) and
    `cvmm()`'s Volta/AMP guard (which queries the CUDA device) skipped.
The clean repository has the "peri" norm scheme only; for "pre"/"post", `MoEUTLayer.forward` is replaced per instance
by a restatement of the training code's layer (RobertCsordas/moeut_training_code,
layers/transformer/relative_moe_transformer.py, `forward` of the layer, preln=1 / preln=0, nonorm=0).

Official bugs sidestepped: the KV-cache RoPE offset (`pos_offset` is computed before the cache is concatenated, so
cached queries are rotated as position 0): our cached decoding is compared with the official *uncached* logits; an
odd number of rotated dimensions (head_dim / 2 is kept even); `AttentionMask(None, None)` (never built: mask=None
lets MoEUTLM build the causal mask).

Tolerance: |ours - official| <= 1e-6 + 1e-5 * max|official| per tensor (fp32; both sides compute the same sums in
different orders). Two negative controls (a swapped LayerNorm, a wrong norm scheme) must fail. Exit status 0 if
every check passes and both controls fail, 1 otherwise.
"""

import argparse
import importlib.util
import sys
import types
import warnings

import torch
import torch.nn.functional as F

RTOL, ATOL = 1e-5, 1e-6
REAL_CUDA = torch.Tensor.cuda
SHAPE_A = dict(vocab=100, d=64, L=4, G=2, H=4, dh=16, NA=4, att_k=2, E=16, es=16, K=4, T=20)
# 3 shared layers, H*dh != d, expert size 6 (unaligned: our split/unbind fallback instead of grouped_mm)
SHAPE_B = dict(vocab=50, d=40, L=6, G=3, H=3, dh=12, NA=3, att_k=1, E=10, es=6, K=3, T=17)


def stub_triton():
    """Minimal `triton` / `triton.language` modules, enough for cvmm.py's decorators and annotations."""
    triton, tl = types.ModuleType("triton"), types.ModuleType("triton.language")
    triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    triton.autotune = lambda *a, **kw: (lambda f: f)
    triton.Config = lambda *a, **kw: None
    triton.cdiv = lambda a, b: -(-a // b)
    tl.constexpr = object
    triton.language = tl
    sys.modules.update({"triton": triton, "triton.language": tl})


def load_official(path):
    """Import `moeut.cvmm` and `moeut.moeut` from the checkout at `path`."""
    import modeling_mom  # noqa: F401  (first: it imports torch._dynamo, which must not see the triton stub)

    stubbed = importlib.util.find_spec("triton") is None
    if stubbed:
        stub_triton()
    sys.path.insert(0, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.library.impl_abstract rename
        import moeut.cvmm as cv
        import moeut.moeut as mm
    if stubbed:
        del sys.modules["triton"], sys.modules["triton.language"]
    return cv, mm


def _dest(sel_index, out_index):
    """Output row of each sorted slot: `out_index`, or `sel_index` when it is the -1 "none" marker."""
    return sel_index if (out_index.numel() == 1 and out_index.item() == -1) else out_index


def cvmm_kernel_ref(x, sel_index, sel, keys, out_dtype, out_index):
    """cvmm_kernel: out[dest_i] = x_flat[sel_index_i] @ keys[sel_i] for sorted slot i; viewed as [*sel.shape, N]."""
    xf = x.flatten(end_dim=-2)
    rows = torch.bmm(xf.index_select(0, sel_index.long()).unsqueeze(1), keys.index_select(0, sel.flatten().long()))
    rows = rows.squeeze(1).to(out_dtype)
    dest = _dest(sel_index, out_index).long()
    assert torch.equal(dest.sort().values, torch.arange(rows.shape[0])), "output rows must be a permutation"
    return rows.new_empty(rows.shape).index_copy(0, dest, rows).view(*sel.shape, keys.shape[-1])


def cvmm_backward_ref(x, sel_index, sel, grads, n_experts, key_dtype, op_dtype, out_index):
    """cvmm_backward_kernel3: grad_W[sel_i] += x_flat[sel_index_i]^T grads_flat[dest_i]."""
    xf, gf = x.flatten(end_dim=-2), grads.flatten(end_dim=-2)
    outer = xf[sel_index.long()].unsqueeze(-1) * gf[_dest(sel_index, out_index).long()].unsqueeze(-2)
    out = torch.zeros(n_experts, xf.shape[-1], gf.shape[-1], dtype=key_dtype)
    return out.index_add(0, sel.flatten().long(), outer.to(key_dtype))


def use_cvmm(cv, mm, mode):
    """Bind the `cvmm` that moeut/moeut.py calls (`from .cvmm import cvmm`) for `mode` (see the module docstring)."""

    def prepared(sel, keys):
        return sel if isinstance(sel, cv.CVMMSel) else cv.cvmm_prepare_sel(sel, keys.shape[0])

    def cvmm_autograd(x, sel, keys):
        """CVMM.forward on the kernel restatement; gradients by autograd."""
        sel = prepared(sel, keys)
        out_index = torch.tensor(-1) if sel.out_index is None else sel.out_index
        res = cvmm_kernel_ref(x, sel.sel_index, sel.sel, keys, cv.get_dtype(), out_index)
        w = sel.reduction_weight
        if w is not None:
            res = res.view(*w.shape, res.shape[-1])
            res = (w.unsqueeze(-2).type_as(res) @ res).squeeze(-2)
        return res

    def cvmm_official(x, sel, keys):
        """The official `cvmm` minus its Volta/AMP guard."""
        sel = prepared(sel, keys)
        return cv.CVMM.apply(x, sel.sel_index, sel.sel, keys, sel.out_index, sel.reduction_weight)

    if mode == "autograd":
        mm.cvmm, torch.Tensor.cuda = cvmm_autograd, REAL_CUDA
    else:
        cv.cvmm_triton_call, cv.cvmm_triton_backward = cvmm_kernel_ref, cvmm_backward_ref
        mm.cvmm, torch.Tensor.cuda = cvmm_official, lambda self, *a, **k: self


def official_pre_forward(self, x, mask=None, kv_cache=None):
    """Training code's pre-LN layer (preln=1): norm1 feeds attention (and its routers), norm2 the whole FFN."""
    xnorm = self.ln1(x)
    att, kv_cache = self.attention(xnorm, xnorm, xnorm, mask, kv_cache=kv_cache)
    x = x + self.drop(att)
    xn = self.ln2(x)
    return x + self.ffn(xn, xn), kv_cache


def official_post_forward(self, x, mask=None, kv_cache=None):
    """Training code's post-LN layer (preln=0): x = norm1(x + att(x)); x = norm2(x + ffn(x))."""
    att, kv_cache = self.attention(x, x, x, mask, kv_cache=kv_cache)
    x = self.ln1(x + self.drop(att))
    return self.ln2(x + self.ffn(x, x)), kv_cache


def build_official(mm, cfg, norm_scheme, seed):
    torch.manual_seed(seed)
    off = mm.MoEUTLM(
        cfg["vocab"], cfg["d"], cfg["L"], cfg["H"], cfg["E"], cfg["NA"], d_head=cfg["dh"], group_size=cfg["G"],
        ff_k=cfg["K"], att_k=cfg["att_k"], ff_expert_size=cfg["es"], dropout=0.0, ff_expert_dropout=0.0,
        att_expert_dropout=0.0, entropy_reg=0.01, att_entropy_reg=0.001,
    )
    with torch.no_grad():  # the official init leaves LayerNorms at (1, 0): perturb so that a swapped one shows
        for name, p in off.named_parameters():
            if ".ln" in name or "out_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    if norm_scheme != "peri":
        forward = official_pre_forward if norm_scheme == "pre" else official_post_forward
        for layer in off.transformer.layers:
            layer.forward = types.MethodType(forward, layer)
    return off


def build_ours(cfg, norm_scheme, attn_impl):
    from modeling_mom import MoEUTConfig, MoEUTForCausalLM

    return MoEUTForCausalLM(MoEUTConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["d"], num_hidden_layers=cfg["L"], num_unique_layers=cfg["G"],
        num_attention_heads=cfg["H"], head_dim=cfg["dh"], num_attention_experts=cfg["NA"],
        num_attention_experts_per_tok=cfg["att_k"], num_experts=cfg["E"], num_experts_per_tok=cfg["K"],
        moe_intermediate_size=cfg["es"], hidden_act="relu", norm_scheme=norm_scheme, partial_rotary_factor=0.5,
        rope_theta=10000.0, router_aux_loss_coef=0.01, attention_router_aux_loss_coef=0.001,
        expert_dropout=0.0, attention_expert_dropout=0.0, attention_output_dropout=0.0, layer_norm_eps=1e-5,
        lm_head_bias=True, tie_word_embeddings=False, attn_implementation=attn_impl,
    ))


def parameter_map(cfg):
    """Official parameter name -> ours (same layout everywhere, no transposes)."""
    mapping = {"embedding.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
               "lm_head.bias": "lm_head.bias", "out_norm.weight": "model.norm.weight",
               "out_norm.bias": "model.norm.bias"}
    per_layer = {
        "ln1.weight": "input_layernorm.weight", "ln1.bias": "input_layernorm.bias",
        "ln2.weight": "post_attention_layernorm.weight", "ln2.bias": "post_attention_layernorm.bias",
        "ffn.keys": "mlp.experts.up_proj", "ffn.values": "mlp.experts.down_proj",
        "ffn.expert_sel": "mlp.router.weight",
        "attention.q.weight": "attention.q_proj.weight", "attention.k.weight": "attention.k_proj.weight",
    }
    if cfg["NA"] > 1:
        per_layer.update({"attention.v": "attention.v_experts", "attention.o": "attention.o_experts",
                          "attention.sel_v": "attention.v_router.weight",
                          "attention.sel_o": "attention.o_router.weight"})
    else:
        per_layer.update({"attention.v": "attention.v_proj.weight", "attention.o": "attention.o_proj.weight",
                          "attention.sel_o": "attention.o_gate"})
    for g in range(cfg["G"]):
        mapping.update({f"transformer.layers.{g}.{k}": f"model.layers.{g}.{v}" for k, v in per_layer.items()})
    return mapping


def build_pair(mm, cfg, norm_scheme, attn_impl, seed):
    """The official model from `seed` and ours with its weights; every parameter on both sides is mapped."""
    off, ours = build_official(mm, cfg, norm_scheme, seed), build_ours(cfg, norm_scheme, attn_impl)
    mapping = parameter_map(cfg)
    off_params, our_params = dict(off.named_parameters()), dict(ours.named_parameters())
    assert set(mapping) == set(off_params), set(mapping) ^ set(off_params)
    assert set(mapping.values()) == set(our_params), set(mapping.values()) ^ set(our_params)
    with torch.no_grad():
        for k, v in mapping.items():
            our_params[v].copy_(off_params[k])
    return off, ours, mapping


class Report:
    """Prints one line per check and collects the labels of failed ones."""

    def __init__(self):
        self.failed = []

    def check(self, label, ours, ref):
        ours, ref = torch.as_tensor(ours).detach().double(), torch.as_tensor(ref).detach().double()
        assert ours.shape == ref.shape, (label, ours.shape, ref.shape)
        diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
        ok = diff <= ATOL + RTOL * scale
        print(f"  {'ok  ' if ok else 'FAIL'} {label:<44s} max|diff|={diff:.3e}  (max|ref|={scale:.3e}, "
              f"rel={diff / max(scale, 1e-30):.1e})")
        if not ok:
            self.failed.append(label)


GROUPS = [("embed_tokens", "embedding"), ("lm_head", "lm_head"), ("model.norm", "final norm"),
          ("layernorm", "layer norms"), ("q_proj", "q/k"), ("k_proj", "q/k"), ("v_experts", "V/O experts"),
          ("o_experts", "V/O experts"), ("v_proj", "V/O dense"), ("o_proj", "V/O dense"),
          ("o_gate", "att output gate"), ("v_router", "V/O routers"), ("o_router", "V/O routers"),
          ("mlp.router", "FFN router"), ("up_proj", "FFN experts"), ("down_proj", "FFN experts")]


def grad_groups(off, ours, mapping, only=None):
    """Gradients concatenated per parameter group: {group: (ours, official)}."""
    off_params, our_params = dict(off.named_parameters()), dict(ours.named_parameters())
    groups = {}
    for k, v in mapping.items():
        group = next(g for key, g in GROUPS if key in v)
        if only is None or group in only:
            groups.setdefault(group, []).append((our_params[v].grad.flatten(), off_params[k].grad.flatten()))
    return {g: (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])) for g, pairs in groups.items()}


def check_cached_decoding(rep, name, ours, ids, ref_logits):
    """Our KV-cached decoding of the last 6 tokens vs the official *uncached* logits (its cache has a RoPE bug)."""
    from modeling_mom.shared_modeling import CACHE_FIELD

    prefix = ids.shape[1] - 6
    with torch.no_grad():
        out = ours(ids[:, :prefix], use_cache=True)
        steps = [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = ours(ids[:, t:t + 1], cache=getattr(out, CACHE_FIELD), use_cache=True)
            steps.append(out.logits)
    rep.check(f"{name} ours cached decode vs official uncached", torch.cat(steps, 1), ref_logits)


def run_variant(mm, rep, name, cfg, norm_scheme="peri", attn_impl="sdpa", seed=0, check_cache=False):
    print(f"\n== {name}: norm={norm_scheme} attn={attn_impl} cfg={cfg}")
    off, ours, mapping = build_pair(mm, cfg, norm_scheme, attn_impl, seed)
    ids = torch.randint(0, cfg["vocab"], (2, cfg["T"]), generator=torch.Generator().manual_seed(seed + 1))

    off.eval(), ours.eval()
    with torch.no_grad():
        ref_logits = off(ids).outputs
        rep.check(f"{name} eval logits", ours(ids, use_cache=False).logits, ref_logits)
    if check_cache:
        check_cached_decoding(rep, name, ours, ids, ref_logits)

    # training mode (dropout 0): LM loss, regulariser, gradients of the total loss
    off.train(), ours.train()
    o_out = off(ids)
    o_ce = F.cross_entropy(o_out.outputs[:, :-1].reshape(-1, cfg["vocab"]), ids[:, 1:].reshape(-1))
    o_reg = o_out.reg_loss.sum()
    (o_ce + o_reg).backward()
    t_out = ours(input_ids=ids, labels=ids, use_cache=False, output_router_logits=True)
    t_ce = t_out.loss - t_out.aux_loss  # our training loss = CE + aux_loss
    t_out.loss.backward()
    rep.check(f"{name} train logits", t_out.logits, o_out.outputs)
    rep.check(f"{name} LM loss (CE)", t_ce, o_ce)
    rep.check(f"{name} entropy reg (aux_loss vs reg_loss)", t_out.aux_loss, o_reg)
    rep.check(f"{name} total loss", t_out.loss, o_ce + o_reg)
    for group, (a, b) in grad_groups(off, ours, mapping).items():
        rep.check(f"{name} grad {group}", a, b)

    # the regulariser alone (~1% of the total loss), on the router parameters
    off.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    off(ids).reg_loss.sum().backward()
    ours(input_ids=ids, use_cache=False, output_router_logits=True).aux_loss.backward()
    for group, (a, b) in grad_groups(off, ours, mapping, only={"FFN router", "V/O routers"}).items():
        rep.check(f"{name} reg-only grad {group}", a, b)


def negative_controls(mm):
    """A swapped LayerNorm and a wrong norm scheme must both fail; returns True if they do."""
    print("\n== negative controls (expected to FAIL)")
    bad = Report()
    ids = torch.randint(0, SHAPE_A["vocab"], (2, SHAPE_A["T"]), generator=torch.Generator().manual_seed(99))
    off, ours, _ = build_pair(mm, SHAPE_A, "peri", "sdpa", 0)
    with torch.no_grad():
        ours.model.layers[1].input_layernorm.weight.copy_(off.transformer.layers[1].ln2.weight)
    off_pre, ours_peri = build_official(mm, SHAPE_A, "pre", 0), build_pair(mm, SHAPE_A, "peri", "sdpa", 0)[1]
    for model in (off, ours, off_pre, ours_peri):
        model.eval()
    with torch.no_grad():
        bad.check("control: ln1<-ln2 in layer 1", ours(ids, use_cache=False).logits, off(ids).outputs)
        bad.check("control: ours peri vs official pre", ours_peri(ids, use_cache=False).logits, off_pre(ids).outputs)
    return len(bad.failed) == 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="RobertCsordas/moeut checkout (contains moeut/)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv, mm = load_official(args.official)
    rep = Report()
    for mode in ("autograd", "official-CVMM-backward"):
        print(f"\n######## official CVMM mode: {mode}")
        use_cvmm(cv, mm, mode)
        tag = "" if mode == "autograd" else "[CVMM.bwd] "
        run_variant(mm, rep, tag + "A-peri", SHAPE_A, check_cache=True)
        run_variant(mm, rep, tag + "A-peri-eager", SHAPE_A, attn_impl="eager", seed=1)
        run_variant(mm, rep, tag + "A-pre", SHAPE_A, norm_scheme="pre", seed=2)
        run_variant(mm, rep, tag + "A-post", SHAPE_A, norm_scheme="post", seed=3)
        run_variant(mm, rep, tag + "A-1attexpert", dict(SHAPE_A, NA=1, att_k=1), seed=4, check_cache=True)
        run_variant(mm, rep, tag + "B-peri", SHAPE_B, seed=5)
    use_cvmm(cv, mm, "autograd")
    if not negative_controls(mm):
        rep.failed.append("negative controls did not fail")
    print(f"\ntolerance: |diff| <= {ATOL} + {RTOL} * max|official|")
    print("FAILED: " + ", ".join(rep.failed) if rep.failed else "ALL OK")
    sys.exit(1 if rep.failed else 0)


if __name__ == "__main__":
    main()
