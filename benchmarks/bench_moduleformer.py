"""ModuleFormer speed against dense baselines, measured in the same run (issue 4, "Speed").

Cases (ratio = ModuleFormer throughput / baseline throughput; target in brackets):
- `train` [>= 2]: forward + backward tokens/s of a MoLM-shaped ModuleFormer (16 attention experts with one head as
  wide as the model and k=2, 32 feed-forward experts of width 2d with k=2, router width 256, keys/values = the
  hidden states, stick-breaking attention) against a dense GPT-2 of the same depth whose width is chosen so that it
  has the same number of non-embedding parameters (the paper compares models of similar total size).
- `decode` [>= 2]: cached greedy decoding tokens/s at batch 1, the same two models.
Stick-breaking attention against SDPA (issue 4's other target) is `bench_attention`.

    python -m benchmarks.bench_moduleformer --json moduleformer.json --markdown moduleformer.md
    OMP_NUM_THREADS=1 python -m benchmarks.bench_moduleformer --threads 1 --hidden 64 --layers 1 --seq 16 \\
        --new-tokens 4 --repeats 1   # smoke test
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
    non_embedding_parameters,
    setup,
    time_interleaved,
    timing_dict,
    train_step,
    write_report,
)
from modeling_mom import ModuleFormerConfig, ModuleFormerForCausalLM

TARGETS = {"train": 2.0, "decode": 2.0}


def build_moduleformer(args) -> ModuleFormerForCausalLM:
    config = ModuleFormerConfig(
        vocab_size=args.vocab,
        bos_token_id=args.vocab - 1,  # the config's default is GPT-2's 50256
        eos_token_id=args.vocab - 1,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=1,
        attention_hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_attention_experts=16,
        num_attention_experts_per_tok=2,
        num_experts=32,
        num_experts_per_tok=2,
        router_hidden_size=256,
    )
    return ModuleFormerForCausalLM(config).to(DTYPES[args.dtype])


def build_dense(args, target_parameters: int) -> GPT2LMHeadModel:
    """A GPT-2 of `args.layers` layers whose width (a multiple of 64) best matches `target_parameters`."""
    width = max(64, round((target_parameters / (12 * args.layers)) ** 0.5 / 64) * 64)
    config = GPT2Config(
        vocab_size=args.vocab,
        bos_token_id=args.vocab - 1,  # GPT2Config's default, 50256, is outside a small vocabulary
        eos_token_id=args.vocab - 1,
        n_positions=2048,
        n_embd=width,
        n_layer=args.layers,
        n_head=width // 64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config).to(DTYPES[args.dtype])


def run_case(case, args):
    moduleformer = build_moduleformer(args)
    dense = build_dense(args, non_embedding_parameters(moduleformer))
    params = {name: non_embedding_parameters(m) for name, m in (("moduleformer", moduleformer), ("dense", dense))}
    if case == "train":
        input_ids = torch.randint(args.vocab, (args.batch, args.seq))
        fns = {name: train_step(m, input_ids) for name, m in (("dense", dense), ("moduleformer", moduleformer))}
        tokens = args.batch * args.seq
    else:
        prompt = torch.randint(args.vocab, (1, args.prompt))
        fns = {
            name: greedy_decode(m, prompt, args.new_tokens)
            for name, m in (("dense", dense), ("moduleformer", moduleformer))
        }
        tokens = args.new_tokens
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    del moduleformer, dense, fns
    gc.collect()
    ratio = timings["dense"].median_s / timings["moduleformer"].median_s  # throughput ratio
    return {
        "case": case,
        "timings": timings,
        "tokens_per_call": tokens,
        "non_embedding_parameters": params,
        "ratio": ratio,
        "met": ratio >= TARGETS[case],
        "baseline": "dense",
    }


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="ModuleFormer width d (MoLM: 1024)")
    parser.add_argument("--layers", type=int, default=4, help="depth of both models (MoLM: 24 or 48)")
    parser.add_argument("--vocab", type=int, default=50295)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cases", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    args = parser.parse_args()
    for name in ("hidden", "layers", "batch", "seq", "prompt", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    setup(args.threads, args.seed, args.malloc, args.device)

    results = [run_case(case, args) for case in args.cases]
    rows = []
    for r in results:
        for name, timing in r["timings"].items():
            is_ours = name == "moduleformer"
            label = f"{name}, {r['non_embedding_parameters'][name] / 1e6:.1f}M non-embedding params"
            rate = r["tokens_per_call"] / timing.median_s
            ratio = f"{rate:.0f} tok/s" + (f"; {r['ratio']:.2f}x (target >= {TARGETS[r['case']]})" if is_ours else "")
            rows.append([r["case"], label, fmt_ms(timing), fmt_load(timing), ratio, "yes" if r["met"] else "no"])
    notes = [
        (
            f"ModuleFormer: d={args.hidden}, {args.layers} layers, 16 attention experts (k=2), 32 FFN experts "
            f"(width {2 * args.hidden}, k=2), dtype={args.dtype}. Training batch {args.batch} x {args.seq}; decoding "
            f"batch 1, prompt {args.prompt}, {args.new_tokens} new tokens."
        )
    ]
    header = ["case", "model", "median (min) ms per call", "foreign load", "throughput / ratio", "met"]
    payload = {
        "args": vars(args),
        "results": [
            {
                **{k: v for k, v in r.items() if k != "timings"},
                "timings": {n: timing_dict(t) for n, t in r["timings"].items()},
            }
            for r in results
        ],
    }
    write_report("ModuleFormer vs dense speed", header, rows, payload, args, notes)


if __name__ == "__main__":
    main()
