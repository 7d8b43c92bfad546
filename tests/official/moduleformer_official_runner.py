"""Official side of the ModuleFormer parity check (compare_moduleformer.py runs it in the official environment).

    OFFICIAL_PYTHON moduleformer_official_runner.py --official PATH/TO/ModuleFormer --out DIR

Imports only torch, transformers 4.x and the IBM/ModuleFormer checkout given by --official, as is (nothing patched).
For every case it builds a tiny official ModuleFormerForCausalLM from a fixed seed, saves it with save_pretrained to
DIR/<case>/official_ckpt and records, in DIR/<case>/official_outputs.pt, inputs and outputs for a short (20) and a
long (200) sequence, each as a full batch of 2 and a left-padded batch of 2:
  eval: fp32 logits (official forward) and fp64 logits (official transformer + lm_head, without the forward's fp32
        cast of the logits), the MI aux loss of the eval forward, the eval loss with labels (the official loss adds
        aux_loss_weight * aux in eval mode too);
  train (dropout 0): LM loss, aux (MI) loss, total loss and every parameter gradient (fp32: backward of the official
        loss; fp64: of LM + 0.1 aux computed in fp64); padded batch: losses only (the official MI loss counts pads);
  generation (short prompt): greedy with the official legacy tuple cache, tokens and per-step scores, plain and
        left-padded, and the official uncached logits of the generated sequences.
"""

import argparse
import copy
import math
import sys
import warnings
from pathlib import Path

import torch

VOCAB, PAD, EOS = 100, 0, 99
AUX_W = 0.1  # aux_loss_weight > 0 so that the official loss includes the MI loss
BASE = dict(
    vocab_size=VOCAB, n_embd=64, n_layer=3, ffd_hidden=128, gating_size=32,
    n_att_experts=8, k_att=2, n_mlp_experts=8, k_mlp=2,
    block_size=128, history_length=128,  # only sizes the unused mask/cum_weight buffers
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, moe_pdrop=0.0, sample_topk=0,
    activation_function="gelu_new", aux_loss_type="mi", aux_loss_weight=AUX_W, gate_type="mlp",
    bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
)
# name -> (config overrides, weights: "init" = official init, "scaled" = redrawn at unit scale, save format)
CASES = {
    "molm_init": (dict(n_head=1, att_hidden=64), "init", "safetensors"),  # K = V = ln_1(x) (Identity), head 64
    "molm_scaled": (dict(n_head=1, att_hidden=64), "scaled", "bin"),
    "kv_scaled": (dict(n_head=4, att_hidden=32), "scaled", "safetensors"),  # k_proj/v_proj Linear, 4 heads of 8
}
LENGTHS = {"short": (20, 7), "long": (200, 61)}  # (sequence length, left padding of row 1)
GEN_KW = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True,
              output_scores=True)


def scale_weights(model, seed):
    """Redraw every parameter at a scale where routing is decisive and stick-breaking betas spread over (0, 1)
    (the official init, U(+-1/in) experts and N(0, 0.02) routers, gives near-uniform routing and beta ~ 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("wte.weight"):
                p.copy_(noise)
            elif ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "w_gate.3" in name:
                p.copy_(2.0 * noise / math.sqrt(p.shape[1]))
            elif "experts.weight" in name or p.dim() == 2:  # experts [E, in, out]; nn.Linear [out, in]
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                raise ValueError(name)


def fp64_logits(m, ids, **kw):
    """Official transformer (ln_f applied) and official lm_head, without the fp32 cast of the CausalLM forward."""
    return m.lm_head(m.transformer(ids, use_cache=False, **kw).last_hidden_state)


def make_inputs(g, seq, pad):
    ids = torch.randint(1, EOS, (2, seq), generator=g)
    pad_ids = torch.randint(1, EOS, (2, seq), generator=g)
    pad_mask = torch.ones(2, seq, dtype=torch.long)
    pad_mask[1, :pad] = 0
    pad_ids[1, :pad] = PAD
    return {"ids": ids, "pad_ids": pad_ids, "pad_mask": pad_mask}


def train_record(m, ids, fp64):
    """One training-mode step: losses and gradients (see the module docstring)."""
    m.train()
    m.zero_grad()
    o = m(ids, labels=ids, use_cache=False, output_hidden_states=True)
    aux = m.transformer.aux_loss
    logits = m.lm_head(o.hidden_states[-1])  # = o.logits in fp32; in fp64 without the official cast
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    (lm + AUX_W * aux if fp64 else o.loss).backward()
    rec = {
        "loss": o.loss.detach(), "aux": aux.detach(), "lm": lm.detach(),
        "grads": {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None},
        "no_grad": [k for k, p in m.named_parameters() if p.grad is None],
    }
    m.zero_grad()
    m.eval()
    return rec


@torch.no_grad()
def eval_record(model, m64, r):
    ids, pad_ids, pad_mask = r["ids"], r["pad_ids"], r["pad_mask"]
    r["logits"] = model(ids, use_cache=False).logits
    r["aux_eval"] = model.transformer.aux_loss.detach().clone()
    r["eval_loss"] = model(ids, labels=ids, use_cache=False).loss
    r["logits_pad"] = model(pad_ids, attention_mask=pad_mask, use_cache=False).logits
    r["logits64"] = fp64_logits(m64, ids)
    r["logits_pad64"] = fp64_logits(m64, pad_ids, attention_mask=pad_mask)


@torch.no_grad()
def padded_train_record(model, r):
    """Training-mode losses of the left-padded batch (pads masked in the labels; the MI loss counts them)."""
    model.train()
    o = model(r["pad_ids"], attention_mask=r["pad_mask"], labels=r["pad_ids"].masked_fill(r["pad_mask"] == 0, -100),
              use_cache=False)
    model.eval()
    return {"loss": o.loss, "aux": model.transformer.aux_loss.detach()}


@torch.no_grad()
def generation_record(model, short):
    """Greedy generation with the official cache (transformers 4.36 keeps the model's legacy tuple cache)."""
    rec = {"prompt": short["ids"][:, :8], "pad_prompt": short["pad_ids"][:, :12],
           "pad_prompt_mask": short["pad_mask"][:, :12]}
    gen = model.generate(rec["prompt"], **GEN_KW)
    rec["gen"], rec["gen_scores"] = gen.sequences, torch.stack(gen.scores, 1)
    rec["gen_uncached_logits"] = model(gen.sequences, use_cache=False).logits
    gen = model.generate(rec["pad_prompt"], attention_mask=rec["pad_prompt_mask"], **GEN_KW)
    rec["gen_pad"], rec["gen_pad_scores"] = gen.sequences, torch.stack(gen.scores, 1)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="IBM/ModuleFormer checkout (contains moduleformer/)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(args.official).resolve()))
    import transformers
    from moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM

    print(f"[official] torch {torch.__version__}, transformers {transformers.__version__}")
    for case_idx, (name, (over, weights, fmt)) in enumerate(CASES.items()):
        torch.manual_seed(1000 + case_idx)
        model = ModuleFormerForCausalLM(ModuleFormerConfig(**{**BASE, **over}))
        if weights == "scaled":
            scale_weights(model, 2000 + case_idx)
        model.eval()
        m64 = copy.deepcopy(model).double()
        ckpt = Path(args.out) / name / "official_ckpt"
        model.save_pretrained(ckpt, safe_serialization=(fmt == "safetensors"))
        g = torch.Generator().manual_seed(3000 + case_idx)
        rec = {}
        for length, (seq, pad) in LENGTHS.items():
            r = rec[length] = make_inputs(g, seq, pad)
            eval_record(model, m64, r)
            r["train"] = train_record(model, r["ids"], fp64=False)
            r["train64"] = train_record(m64, r["ids"], fp64=True)
            r["train_pad"] = padded_train_record(model, r)
        rec.update(generation_record(model, rec["short"]))
        torch.save(rec, ckpt.parent / "official_outputs.pt")
        print(f"[official] {name}: saved {ckpt} ({fmt}); greedy {rec['gen'].tolist()}")


if __name__ == "__main__":
    main()
