"""Numerical parity of our ModuleFormer (`modeling_mom`) with the official code (IBM/ModuleFormer) on identical weights.

    python -m tests.official.compare_moduleformer --official PATH/TO/ModuleFormer --official-python PYTHON

1. moduleformer_official_runner.py runs under --official-python (an interpreter with torch and transformers 4.36):
   it builds tiny official models from fixed seeds, saves them with save_pretrained and records their inputs and
   outputs (see its docstring);
2. each checkpoint is converted with our CLI (`python -m conversion.molm_to_moduleformer --src ... --out ...`) and
   loaded as our README says (`import modeling_mom; AutoModelForCausalLM.from_pretrained(out)`), in fp32 and fp64;
3. everything is compared here: eval logits (plain and left-padded), the MI aux loss, the eval loss, training-mode
   LM / aux / total losses and every gradient (fp32 and fp64), greedy cached generation (tokens and step scores,
   plain and left-padded), and that loading an official checkpoint directly is refused.

Tolerances, on max|ours - official| / max|official| per tensor (per parameter group for gradients): fp32 2e-5,
fp32 gradients 1e-4, fp64 1e-11, fp64 gradients 1e-10. Both sides sum the same terms in different orders
(grouped_mm vs per-expert mm; stick-breaking as a cumprod of (1 - beta) vs exp of a matmul of log(1 - beta)), about
1e-6 relative in fp32 after 3 layers; a routing flip or a formula difference gives > 1e-2. The MI loss is a
difference of two entropies of size ~log E that nearly cancel, so it is measured relative to 2 L log E.
Rows marked "info" are deliberate differences, reported and not checked. Negative controls (built in): our model
with a wrong gate normalisation or stick-breaking variant must miss by > 100x the fp32 tolerance. Exit status 0 if
every check passes, 1 otherwise.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tests.official.moduleformer_official_runner import AUX_W, GEN_KW, VOCAB

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("moduleformer_official_runner.py")
TOL = {"fp32": 2e-5, "fp32_grad": 1e-4, "fp64": 1e-11, "fp64_grad": 1e-10}
NEGATIVE_CONTROLS = ({"normalize_expert_gates": True}, {"attention_function": "stickbreaking_2024"})


class Report:
    """Result rows (printed at the end) and the failed checks."""

    def __init__(self):
        self.rows, self.failures = [], []

    def add(self, case, what, text, ok):
        """`ok`: True / False for a check, None for an information row."""
        status = "info" if ok is None else ("ok" if ok else "FAIL")
        self.rows.append(f"{case:16s} {what:48s} {text} {status}")
        if ok is False:
            self.failures.append(f"{case}: {what}")

    def record(self, case, what, ours, ref, tol=None, mask=None, scale=None):
        """max|ours - ref| relative to `scale` (default max|ref|), checked against `tol` unless it is None."""
        ours, ref = ours.double(), ref.double()
        if mask is not None:
            ours, ref = ours[mask], ref[mask]
        diff = (ours - ref).abs().max().item()
        scale = ref.abs().max().item() if scale is None else scale
        rel = diff / max(scale, 1e-30)
        self.add(case, what, f"maxabs={diff:.3e} rel={rel:.3e} (|ref|max={scale:.3g})" + (
            "" if tol is None else f" tol={tol:g}"), None if tol is None else rel <= tol)

    def check_equal(self, case, what, ours, ref):
        same = torch.equal(ours, ref)
        self.add(case, what, f"equal={same}", same)
        if not same:
            self.rows.append(f"{'':19s}ours={ours.tolist()}\n{'':19s}ref ={ref.tolist()}")


def param_group(name):
    """Official parameter name -> the group whose worst gradient is reported."""
    if "wte" in name or "lm_head" in name:
        return "wte" if "wte" in name else "lm_head"
    if ".ln_" in name or "ln_f" in name:
        return "layernorms"
    if "k_proj" in name or "v_proj" in name:
        return "k/v proj"
    pool = "attn" if "q_proj" in name else "mlp"
    return f"{pool} router" if "gate" in name else f"{pool} experts"


def run_train(model, ids):
    """Training-mode forward with labels; backward of the model's loss (fp32) or, in fp64, of LM + 0.1 aux computed
    in fp64 (the models' own losses take the CE in fp32 on both sides, which would hide fp64 agreement)."""
    model.train()
    model.zero_grad()
    out = model(ids, labels=ids, output_router_logits=True, use_cache=False)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    (out.loss if model.dtype == torch.float32 else lm + AUX_W * out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.eval()
    return out.loss.detach(), out.aux_loss.detach(), lm.detach(), grads


def compare_grads(rep, c, tag, grads, ref_grads, rename):
    """Worst relative gradient difference per parameter group (official names mapped by the converter's rename)."""
    worst = {}
    for name, g_ref in ref_grads.items():
        diff = (grads[rename(name)].double() - g_ref.double()).abs().max().item()
        rel = diff / max(g_ref.abs().max().item(), 1e-30)
        if rel >= worst.get(param_group(name), (0.0, -1.0, ""))[1]:
            worst[param_group(name)] = (diff, rel, name)
    unmapped = set(grads) - {rename(name) for name in ref_grads}
    rep.add(c, f"grad {tag}: our gradients without an official one", sorted(unmapped), not unmapped)
    tol = TOL[tag + "_grad"]
    for group, (diff, rel, name) in sorted(worst.items()):
        rep.add(c, f"grad {tag} {group}", f"maxabs={diff:.3e} rel={rel:.3e} (worst: {name}) tol={tol:g}", rel <= tol)


def check_length(rep, c, model, model64, r, aux_scale, rename):
    """Eval, training and padded-training checks of one sequence length."""
    from modeling_mom.routing_losses import mutual_information_loss

    ids, pad_ids, pad_mask = r["ids"], r["pad_ids"], r["pad_mask"]
    real = pad_mask.bool()
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
        rep.record(c, "eval logits fp32", out.logits, r["logits"], TOL["fp32"])
        rep.record(c, "eval aux (MI) fp32 [rel. to 2L*log E]", out.aux_loss, r["aux_eval"], TOL["fp32"],
                   scale=aux_scale)
        out = model(ids, labels=ids, output_router_logits=True)
        rep.record(c, "eval loss w/ labels (ours CE only; off. +0.1aux)", out.loss, r["eval_loss"])
        rep.record(c, "eval loss: ours CE + 0.1*aux vs official", out.loss + AUX_W * out.aux_loss, r["eval_loss"],
                   TOL["fp32"])
        logits_pad = model(pad_ids, attention_mask=pad_mask).logits
        rep.record(c, "eval logits fp32 left-padded (real tokens)", logits_pad, r["logits_pad"], TOL["fp32"], real)
        rep.record(c, "eval logits fp32 left-padded (pad positions)", logits_pad, r["logits_pad"], None, ~real)
        rep.record(c, "eval logits fp64", model64(ids).logits, r["logits64"], TOL["fp64"])
        rep.record(c, "eval logits fp64 left-padded (real tokens)", model64(pad_ids, attention_mask=pad_mask).logits,
                   r["logits_pad64"], TOL["fp64"], real)

    for tag, m in (("fp32", model), ("fp64", model64)):
        t = r["train64" if tag == "fp64" else "train"]
        assert not t["no_grad"], t["no_grad"]
        loss, aux, lm, grads = run_train(m, ids)
        rep.record(c, f"train {tag} LM loss", lm, t["lm"], TOL[tag])
        rep.record(c, f"train {tag} aux (MI) loss [rel. to 2L*log E]", aux, t["aux"], TOL[tag], scale=aux_scale)
        if tag == "fp32":
            rep.record(c, "train fp32 total loss (LM + 0.1 aux)", loss, t["loss"], TOL[tag])
        else:  # the models' own losses take the CE in fp32 on both sides; recombine in fp64 here
            rep.record(c, "train fp64 total loss (LM + 0.1 aux, in fp64)", lm + AUX_W * aux,
                       t["lm"] + AUX_W * t["aux"], TOL[tag])
        compare_grads(rep, c, tag, grads, t["grads"], rename)

    # Left-padded batch in training mode. The official MI loss counts padding tokens (it never passes skip_mask);
    # ours excludes them by design: reported, then checked with the pads counted.
    model.train()
    with torch.no_grad():
        out = model(pad_ids, attention_mask=pad_mask, labels=pad_ids.masked_fill(~real, -100),
                    output_router_logits=True)
    model.eval()
    t = r["train_pad"]
    rep.record(c, "train fp32 left-padded LM loss", out.loss - AUX_W * out.aux_loss, t["loss"] - AUX_W * t["aux"],
               TOL["fp32"])
    rep.record(c, "train fp32 left-padded aux (ours: pads excluded)", out.aux_loss, t["aux"])
    counted = sum(mutual_information_loss(logits) for logits in out.router_logits)
    rep.record(c, "  same, our router logits w/ pads counted", counted, t["aux"], TOL["fp32"], scale=aux_scale)


@torch.no_grad()
def check_generation(rep, c, model, ref):
    """Greedy cached generation: tokens and per-step scores, plain and left-padded."""
    n_prompt = ref["prompt"].shape[1]  # first: is the official cache consistent with its own uncached forward?
    rep.record(c, "official: cached scores vs its uncached logits", ref["gen_scores"],
               ref["gen_uncached_logits"][:, n_prompt - 1:-1], TOL["fp32"])
    for label, prompt, mask, key in (("", ref["prompt"], None, "gen"),
                                     (", left-padded", ref["pad_prompt"], ref["pad_prompt_mask"], "gen_pad")):
        gen = model.generate(prompt, attention_mask=mask, **GEN_KW)
        rep.check_equal(c, f"greedy cached generation tokens{label}", gen.sequences, ref[key])
        if gen.sequences.shape == ref[key].shape:
            rep.record(c, f"greedy generation step scores{label}", torch.stack(gen.scores, 1), ref[key + "_scores"],
                       TOL["fp32"])


def check_negative_controls(rep, case, conv, ref):
    """A deliberate semantic change on our side must miss by more than 100x the fp32 tolerance."""
    from transformers import AutoModelForCausalLM

    for change in NEGATIVE_CONTROLS:
        wrong = AutoModelForCausalLM.from_pretrained(conv, **change).eval()
        with torch.no_grad():
            diff = (wrong(ref["short"]["ids"]).logits - ref["short"]["logits"]).abs().max().item()
        rel = diff / ref["short"]["logits"].abs().max().item()
        rep.add(f"{case}/ctl", f"negative control {change}", f"rel={rel:.3e} caught={rel > 100 * TOL['fp32']}",
                rel > 100 * TOL["fp32"])


def check_case(rep, case_dir):
    from transformers import AutoModelForCausalLM

    from conversion.molm_to_moduleformer import rename

    case, conv = case_dir.name, case_dir / "ours_converted"
    ref = torch.load(case_dir / "official_outputs.pt", weights_only=False)
    subprocess.run([sys.executable, "-m", "conversion.molm_to_moduleformer", "--src", str(case_dir / "official_ckpt"),
                    "--out", str(conv), "--overwrite"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    try:  # our README: an official checkpoint loaded directly is refused, naming the conversion command
        AutoModelForCausalLM.from_pretrained(case_dir / "official_ckpt")
        refused = False
    except ValueError as err:
        refused = "conversion.molm_to_moduleformer" in str(err)
    rep.add(case, "direct load of the official checkpoint refused", refused, refused)
    model = AutoModelForCausalLM.from_pretrained(conv).eval()
    model64 = AutoModelForCausalLM.from_pretrained(conv).double().eval()
    aux_scale = 2 * model.config.num_hidden_layers * math.log(model.config.num_experts)
    for length in ("short", "long"):
        r = ref[length]
        check_length(rep, f"{case}/{length[0]}{r['ids'].shape[1]}", model, model64, r, aux_scale, rename)
    check_generation(rep, f"{case}/gen", model, ref)
    check_negative_controls(rep, case, conv, ref)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="IBM/ModuleFormer checkout (contains moduleformer/)")
    ap.add_argument("--official-python", required=True, help="interpreter with torch and transformers 4.36.2")
    ap.add_argument("--workdir", help="keep the official checkpoints and outputs here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # also for the conversion CLI
    import transformers

    import modeling_mom  # noqa: F401  registers the architectures with the Auto classes

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        subprocess.run([args.official_python, str(RUNNER), "--official", args.official, "--out", str(work)],
                       check=True)
        print(f"[ours] torch {torch.__version__}, transformers {transformers.__version__}")
        rep = Report()
        for case_dir in sorted(p for p in work.iterdir() if (p / "official_outputs.pt").exists()):
            check_case(rep, case_dir)
    print("\n".join(rep.rows))
    if rep.failures:
        print(f"\nFAILED ({len(rep.failures)}):\n  " + "\n  ".join(rep.failures))
        sys.exit(1)
    print(f"\nALL CHECKS PASSED (tolerances, relative to max|official|: {TOL})")


if __name__ == "__main__":
    main()
