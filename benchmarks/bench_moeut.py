"""MoEUT speed against dense baselines, measured in the same run (issue 3, "Speed").

Cases (ratio = MoEUT median / baseline median; target in brackets where the issue sets one):
- `sigma_moe` [<= 1.5]: forward + backward of one sigma-MoE feed-forward block (router included) at the 244M shape
  (d=1024, 387 experts of 128, K=16, 1024 tokens) vs a dense ReLU FFN of the same active width (d_ff = K x 128).
- `train`: forward + backward of a MoEUT-44M-shaped model (`MoEUTConfig.from_preset("moeut-44m")`, regulariser on)
  vs a dense pre-LN GPT-2 of the paper's 44M baseline depth and width (16 layers, d=412) whose MLP width is chosen
  to match MoEUT's parameter count; both counts are reported. No target: reported beside the MACs ratio.
- `decode`: cached greedy `generate` per new token (batch 1), the same two models.

The MACs ratio is the paper's formula (moeut.md section 3.4, `paper/moe_universal/common.py`) for a sequence of the
training length: attention + FFN MACs per layer, MoEUT / dense baseline. GPT-2 stands in for the paper's dense
baseline (learned positions and GELU instead of partial RoPE and ReLU; 4 heads of 103 instead of 10 of 41, since
412 is not divisible by 10), which changes its time by little.

    python -m benchmarks.bench_moeut --json moeut.json --markdown moeut.md
    OMP_NUM_THREADS=1 python -m benchmarks.bench_moeut --threads 1 --tiny --repeats 1   # smoke test
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import gc

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import (
    DTYPES,
    build_parser,
    count_parameters,
    fmt_load,
    fmt_ms,
    greedy_decode,
    per_token,
    setup,
    time_interleaved,
    timing_dict,
    train_step,
    write_report,
)
from modeling_mom import MoEUTConfig, MoEUTForCausalLM

TARGETS = {"sigma_moe": 1.5, "train": None, "decode": None}
SIGMA_MOE_SHAPE = {"hidden_size": 1024, "num_experts": 387, "num_experts_per_tok": 16, "moe_intermediate_size": 128}
TINY_SIGMA_MOE_SHAPE = {"hidden_size": 64, "num_experts": 24, "num_experts_per_tok": 4, "moe_intermediate_size": 16}


TINY_MODEL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, head_dim=32, num_attention_experts=4,
                  num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, output_router_logits=True)


def moeut_config(args) -> MoEUTConfig:
    if args.tiny:
        return MoEUTConfig(vocab_size=args.vocab, **TINY_MODEL)
    return MoEUTConfig.from_preset("moeut-44m", vocab_size=args.vocab)


def matched_gpt2(c: MoEUTConfig, heads: int, positions: int = 1024, layers: int | None = None) -> GPT2LMHeadModel:
    """A pre-LN GPT-2 of the MoEUT's depth and width, with `positions` learned positions, whose MLP width makes its
    parameter count match the MoEUT's. Its head is tied or untied as the MoEUT's (untied in the presets and the
    paper's baselines): a tied baseline would spend the MoEUT's separate head on a wider MLP (+7.6% non-embedding
    parameters at 44M). With `layers`, only that many layers of that matched model are built (the baseline of a MoEUT
    layer stack with fewer repeats: its layers are the full-depth matched model's)."""
    d = c.hidden_size

    def build(inner, depth=c.num_hidden_layers):
        config = GPT2Config(vocab_size=c.vocab_size, n_positions=positions, n_embd=d, n_layer=depth, n_head=heads,
                            bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, n_inner=inner,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")  # fmt: skip
        with torch.device("meta"):
            return config, count_parameters(GPT2LMHeadModel(config))

    with torch.device("meta"):
        target = count_parameters(MoEUTForCausalLM(c))
    _, params = build(4 * d)
    per_unit = c.num_hidden_layers * (2 * d + 1)  # one more MLP unit per layer: a column of c_fc (+ bias), a c_proj row
    config, _ = build(max(1, 4 * d + round((target - params) / per_unit)), layers or c.num_hidden_layers)
    return GPT2LMHeadModel(config)


def stack_244m_config(args, layers: int) -> MoEUTConfig:
    """The 244M preset (its 2 shared layers, widths, experts) applied `layers` times in all instead of 18: issue 6's
    "MoEUT-244M-shaped layer stack, fewer repeats if CPU time demands" (with `args.tiny`, the tiny config)."""
    if args.tiny:
        return MoEUTConfig(vocab_size=args.vocab, **{**TINY_MODEL, "num_hidden_layers": layers})
    return MoEUTConfig.from_preset("moeut-244m", vocab_size=args.vocab, num_hidden_layers=layers)


def paper_macs_ratio(config: MoEUTConfig, baseline_ff: int, baseline_heads: int, seq: int) -> float:
    """MoEUT / dense MACs per layer and sequence (moeut.md 3.4; the official formulas, selection MACs included)."""
    d, heads, dh = config.hidden_size, config.num_attention_heads, config.head_dim
    k = config.num_attention_experts_per_tok
    att = 2 * heads * dh * seq**2 + (2 * k + 2) * d * heads * dh * seq + 2 * heads * k * seq * dh
    att += 2 * config.num_attention_experts * d * seq
    ff = 2 * seq * d * config.moe_intermediate_size * config.num_experts_per_tok + seq * d * config.num_experts
    base_dh = d // baseline_heads
    base = 2 * baseline_heads * base_dh * seq**2 + 4 * d * baseline_heads * base_dh * seq + 2 * d * baseline_ff * seq
    return (att + ff) / base


def sigma_moe_case(args):
    shape = TINY_SIGMA_MOE_SHAPE if args.tiny else SIGMA_MOE_SHAPE
    dtype = DTYPES[args.dtype]
    config = MoEUTConfig(**shape, vocab_size=8, num_attention_heads=1, head_dim=8)
    ffn = MoEUTForCausalLM(config).model.layers[0].mlp.to(dtype)  # initialised like the model's
    width = shape["num_experts_per_tok"] * shape["moe_intermediate_size"]
    d = shape["hidden_size"]
    dense = nn.Sequential(nn.Linear(d, width, bias=False), nn.ReLU(), nn.Linear(width, d, bias=False)).to(dtype)
    x = torch.randn(args.tokens, d, dtype=dtype, requires_grad=True)
    router_input = torch.randn(args.tokens, d, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, d, dtype=dtype)

    def moe_step():
        ffn.zero_grad(set_to_none=True)
        ffn(x, router_input).backward(grad)

    def dense_step():
        dense.zero_grad(set_to_none=True)
        dense(x).backward(grad)

    return {"dense": dense_step, "moeut": moe_step}, f"dense ReLU FFN d_ff={width}"


def run_case(case: str, args) -> dict:
    """Build the two sides of `case`, time them alternately, free them; return the timings and the ratio."""
    extra = {}
    if case == "sigma_moe":
        fns, baseline = sigma_moe_case(args)
    else:
        moeut = MoEUTForCausalLM(moeut_config(args)).to(DTYPES[args.dtype])
        gpt2 = matched_gpt2(moeut.config, args.baseline_heads).to(DTYPES[args.dtype])
        baseline = f"GPT-2 pre-LN, {gpt2.config.n_layer} x d={gpt2.config.n_embd}, d_ff={gpt2.config.n_inner}"
        extra = {"moeut_parameters": count_parameters(moeut), "baseline_parameters": count_parameters(gpt2)}
        extra["paper_macs_ratio"] = paper_macs_ratio(moeut.config, gpt2.config.n_inner, args.baseline_heads, args.seq)
        if case == "train":
            input_ids = torch.randint(moeut.config.vocab_size, (args.batch, args.seq))
            fns = {"dense": train_step(gpt2, input_ids), "moeut": train_step(moeut, input_ids)}
        else:
            prompt = torch.randint(1, moeut.config.vocab_size, (1, args.prompt))
            fns = {name: greedy_decode(m, prompt, args.new_tokens) for name, m in (("dense", gpt2), ("moeut", moeut))}
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    if case == "decode":
        timings = {name: per_token(t, args.new_tokens) for name, t in timings.items()}
    del fns
    gc.collect()
    base, moe = timings["dense"], timings["moeut"]
    return {
        "case": case,
        "baseline": baseline,
        "dense": timing_dict(base),
        "moeut": timing_dict(moe),
        "ratio_median": moe.median_s / base.median_s,
        "ratio_min": moe.min_s / base.min_s,
        "target": TARGETS[case],
        **extra,
        "timings": timings,
    }


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the sigma_moe case (default 1024)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary (default 8000, the paper's)")
    parser.add_argument("--baseline-heads", type=int, default=4, help="dense baseline heads (default 4)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size (default 4)")
    parser.add_argument("--seq", type=int, default=256, help="training sequence length (default 256)")
    parser.add_argument("--prompt", type=int, default=32, help="decoding prompt length (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode (default 32)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a smoke test")
    args = parser.parse_args()
    for name in ("tokens", "batch", "seq", "prompt", "new_tokens", "baseline_heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    if args.seq > 1024 or args.prompt + args.new_tokens > 1024:
        parser.error(f"--seq={args.seq} and --prompt + --new-tokens={args.prompt + args.new_tokens} must be <= 1024")
    setup(args.threads, args.seed, args.malloc, args.device)

    results = [run_case(case, args) for case in args.cases]
    rows = []
    for r in results:
        unit = "ms/token" if r["case"] == "decode" else "ms/step"
        base, moe = r["timings"]["dense"], r["timings"]["moeut"]
        target = "" if r["target"] is None else f"<= {r['target']}"
        met = "" if r["target"] is None else ("yes" if r["ratio_median"] <= r["target"] else "no")
        macs = f"{r['paper_macs_ratio']:.2f}" if "paper_macs_ratio" in r else ""
        ratio = f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f})"
        rows.append([f"{r['case']} ({unit})", r["baseline"], fmt_ms(base), fmt_load(base), "", "", "", ""])
        rows.append([f"{r['case']} ({unit})", "MoEUT", fmt_ms(moe), fmt_load(moe), ratio, macs, target, met])
    counts = [r for r in results if "moeut_parameters" in r]
    notes = [
        (
            f"sigma_moe shape: {TINY_SIGMA_MOE_SHAPE if args.tiny else SIGMA_MOE_SHAPE}, {args.tokens} tokens; "
            f"dtype={args.dtype}; training batch {args.batch} x {args.seq}; decoding batch 1, prompt {args.prompt}, "
            f"{args.new_tokens} new tokens."
        ),
    ]
    if counts:
        notes.append(
            f"Parameters: MoEUT {counts[0]['moeut_parameters'] / 1e6:.2f}M, dense baseline "
            f"{counts[0]['baseline_parameters'] / 1e6:.2f}M. MACs ratio: the paper's formula at --seq."
        )
    header = ["case", "model", "median (min)", "foreign load", "MoEUT / dense, median (min)", "MACs ratio",
              "target", "met"]  # fmt: skip
    payload = {"args": vars(args), "results": [{k: v for k, v in r.items() if k != "timings"} for r in results]}
    write_report("MoEUT vs dense speed", header, rows, payload, args, notes)


if __name__ == "__main__":
    main()
