"""MoM against HF `GPT2LMHeadModel` of the same shape, measured in the same run (issue 2, "Speed").

Cases (ratio = MoM median / GPT-2 median; target in brackets):
- `train_sequential` [<= 1.15]: forward + backward (loss on the batch as its own labels) of MoM with
  `routing_mode="sequential"`, whose structure adds up to the GPT-2 depth, vs GPT-2.
- `train_learned` [<= 1.3]: the same structure with learned routing, one module per token
  (`num_modules_per_tok=1`, load-balancing loss on), vs a GPT-2 of the same unrolled depth. SKIP is off unless
  `--enable-skip`: with it, tokens that pick SKIP do no work, which would flatter MoM.
- `decode` [<= 1.25]: cached greedy `generate` (batch 1, `--prompt` tokens, exactly `--new-tokens` new tokens),
  MoM sequential vs GPT-2; time per new token (the prompt's prefill included).

Both models use SDPA attention, no dropout, random weights (speed does not depend on them), the same dtype and
threads. Calls of the two models alternate, so a change in the machine's load hits both alike.

The default shape is GPT-2 small: d=768, 12 heads, vocabulary 50257, 12 layers, which MoM builds as 1 bottom
layer + 2 chunks x (4 modules / 4 rounds + 1 anchor layer) + 1 top layer (MoM's default structure). A full run
(5 repeats) should take 3-4 minutes with 2 threads on the 2-core reference machine (estimated, not measured: about
0.8 TFLOP per training step at ~140 GFLOP/s, 24 timed and warm-up steps, plus decoding); `--layers 6` halves it.

    python -m benchmarks.bench_mom --json mom.json --markdown mom.md
    OMP_NUM_THREADS=1 python -m benchmarks.bench_mom --threads 1 --layers 2 --seq 32 --repeats 1   # smoke test
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import gc

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import (
    DTYPES,
    build_parser,
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
from modeling_mom import MoMConfig, MoMForCausalLM

TARGETS = {"train_sequential": 1.15, "train_learned": 1.3, "decode": 1.25}


def mom_structure(layers: int, modules: int) -> dict:
    """Bottom/top layers and chunks of `modules` modules (= rounds) + an anchor, adding up to `layers`."""
    if layers < 2:
        raise ValueError(f"--layers={layers}: MoM needs at least 2 (a chunk of one round and its anchor layer).")
    modules = min(modules, layers - 1)
    chunks = max(1, (layers - 2) // (modules + 1))
    rest = layers - chunks * (modules + 1)
    return {
        "num_bottom_layers": (rest + 1) // 2,
        "num_top_layers": rest // 2,
        "num_chunks": chunks,
        "num_attention_modules": modules,
        "num_ffn_modules": modules,
        "num_rounds": modules,
        "use_anchor_layers": True,
    }


def build_gpt2(args, layers: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=args.vocab,
        bos_token_id=args.vocab - 1,  # GPT2Config's default, 50256, is outside a small vocabulary
        eos_token_id=args.vocab - 1,
        n_positions=args.positions,
        n_embd=args.hidden,
        n_layer=layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config).to(DTYPES[args.dtype])


def build_mom(args, routing_mode: str) -> MoMForCausalLM:
    config = MoMConfig(
        vocab_size=args.vocab,
        bos_token_id=args.vocab - 1,  # MoMConfig's default is GPT-2's 50256
        eos_token_id=args.vocab - 1,
        max_position_embeddings=args.positions,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        routing_mode=routing_mode,
        num_modules_per_tok=1,
        enable_skip=args.enable_skip,
        attn_implementation="sdpa",
        **mom_structure(args.layers, args.modules),
    )
    return MoMForCausalLM(config).to(DTYPES[args.dtype])


def run_case(case: str, args) -> dict:
    """Build the two models of `case`, time them alternately, free them; return the two timings and the ratio."""
    if case == "decode":
        mom = build_mom(args, "sequential")
        gpt2 = build_gpt2(args, mom.config.num_hidden_layers)
        prompt = torch.randint(args.vocab, (1, args.prompt))
        fns = {name: greedy_decode(model, prompt, args.new_tokens) for name, model in (("gpt2", gpt2), ("mom", mom))}
    else:
        mom = build_mom(args, "sequential" if case == "train_sequential" else "learned")
        gpt2 = build_gpt2(args, mom.config.num_hidden_layers)
        input_ids = torch.randint(args.vocab, (args.batch, args.seq))
        fns = {"gpt2": train_step(gpt2, input_ids), "mom": train_step(mom, input_ids)}
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    if case == "decode":
        timings = {name: per_token(t, args.new_tokens) for name, t in timings.items()}
    depth = mom.config.num_hidden_layers
    del mom, gpt2, fns
    gc.collect()
    base, mom_timing = timings["gpt2"], timings["mom"]
    return {
        "case": case,
        "baseline_layers": depth,
        "gpt2": timing_dict(base),
        "mom": timing_dict(mom_timing),
        "ratio_median": mom_timing.median_s / base.median_s,
        "ratio_min": mom_timing.min_s / base.min_s,
        "target": TARGETS[case],
        "unit": "s per new token" if case == "decode" else "s per forward+backward",
        "timings": timings,
    }


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 depth = MoM unrolled depth (default 12)")
    parser.add_argument("--modules", type=int, default=4, help="modules per pool and rounds per chunk (default 4)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=1024, help="learned position table size (default 1024)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size (default 4)")
    parser.add_argument("--seq", type=int, default=256, help="training sequence length (default 256)")
    parser.add_argument("--prompt", type=int, default=32, help="decoding prompt length (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode (default 64)")
    parser.add_argument("--enable-skip", action="store_true", help="let learned routers pick SKIP")
    parser.add_argument("--cases", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    args = parser.parse_args()
    for name in ("batch", "seq", "prompt", "new_tokens", "modules"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    if args.seq > 1024 or args.prompt + args.new_tokens > 1024:
        parser.error(f"--seq={args.seq} and --prompt + --new-tokens={args.prompt + args.new_tokens} must be <= 1024")
    try:
        structure = mom_structure(args.layers, args.modules)
    except ValueError as error:
        parser.error(str(error))
    setup(args.threads, args.seed, args.malloc, args.device)

    results = [run_case(case, args) for case in args.cases]
    rows = []
    for r in results:
        case = f"{r['case']} (ms/token)" if r["case"] == "decode" else f"{r['case']} (ms/step)"
        base, mom = r["timings"]["gpt2"], r["timings"]["mom"]
        met = "yes" if r["ratio_median"] <= r["target"] else "no"
        ratio = f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f})"
        rows.append([case, f"GPT-2, {r['baseline_layers']} layers", fmt_ms(base), fmt_load(base), "", "", ""])
        rows.append([case, "MoM", fmt_ms(mom), fmt_load(mom), ratio, f"<= {r['target']}", met])
    notes = [
        (
            f"Shape: d={args.hidden}, heads={args.heads}, vocab={args.vocab}, dtype={args.dtype}; training batch "
            f"{args.batch} x {args.seq}; decoding batch 1, prompt {args.prompt}, {args.new_tokens} new tokens."
        ),
        (
            f"MoM structure: {', '.join(f'{k}={v}' for k, v in structure.items())}; learned routing: K=1, "
            f"enable_skip={args.enable_skip}, load-balancing loss on."
        ),
    ]
    header = ["case", "model", "median (min)", "foreign load", "MoM / GPT-2, median (min)", "target", "met"]
    payload = {
        "args": vars(args),
        "mom_structure": structure,
        "results": [{k: v for k, v in r.items() if k != "timings"} for r in results],
    }
    write_report("MoM vs GPT-2 speed", header, rows, payload, args, notes)


if __name__ == "__main__":
    main()
