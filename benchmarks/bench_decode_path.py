"""The dispatch's two paths without autograd: one weighted `embedding_bag` against `grouped_mm`, by rows per expert.

    python -m benchmarks.bench_decode_path --json decode_path.json --markdown decode_path.md
    python -m benchmarks.bench_decode_path --moeut-forward --repeats 30   # MoEUT-44M: unsorted bags vs sorted
    OMP_NUM_THREADS=1 python -m benchmarks.bench_decode_path --threads 1 --repeats 1 --tiny   # smoke test

`moe_dispatch.grouped_linear` computes a projection through `embedding_bag` (each row times its expert's weight,
reading that weight once per row) when its experts have at most 2^18 weights and at most 6 rows each on average,
and through `grouped_mm` (each expert's weight read once for all its rows, one product per expert) otherwise.
This measures both on the same sorted rows, one projection at a time, at each architecture's expert shapes, so the
limits can be checked on another machine: "grouped / bag" > 1 means the bag is faster, and "taken" says which path
the dispatch picks there.

`--moeut-forward` times whole MoEUT-44M forwards without autograd instead (batch x tokens: decoding steps and short
prompts), with MoEUT's unsorted bags (`moe_dispatch.bag_mixture`, taken at most one choice per expert) and with
them switched off (the sorted dispatch, whose projections may still run as bags), alternating.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

from unittest import mock

import torch

from benchmarks.common import DTYPES, Timing, build_parser, fmt_load, setup, time_interleaved, timing_dict, write_report
from modeling_mom import MoEUTConfig, MoEUTForCausalLM, modeling_moeut
from modeling_mom.moe_dispatch import _GROUPED_MM, _bag_wins, bag_mixture, plan_dispatch

SHAPES = {  # name: (experts, in, out)
    "moeut-244m ffn up": (387, 1024, 128),
    "moeut-244m ffn down": (387, 128, 1024),
    "moeut-44m ffn up": (155, 412, 128),
    "moeut-244m switchhead v": (40, 1024, 128),
    "molm ffn up": (32, 1024, 2048),
    "mom attention qkv": (4, 768, 2304),
    "mom ffn up": (4, 768, 3072),
}
ROWS_PER_EXPERT = (0.25, 1, 2, 4, 6, 8, 16)
TINY = {"tiny": (6, 32, 16)}
FORWARD_SHAPES = ((1, 1), (8, 1), (1, 4), (1, 16), (1, 64))  # (batch, tokens)


def fmt_us(timing: Timing) -> str:
    """`median (min) µs`: these calls take tens of microseconds to a few milliseconds."""
    mark = " ⚠" if timing.disturbed else ""
    return f"{timing.median_s * 1e6:.0f} ({timing.min_s * 1e6:.0f}){mark}"


def projection_functions(num_experts: int, in_features: int, out_features: int, rows: int, dtype):
    """Both paths on `rows` rows with random experts (one expert per row), and whether the dispatch takes the bag."""
    weight = torch.randn(num_experts, in_features, out_features, dtype=dtype) * in_features**-0.5
    plan = plan_dispatch(torch.randint(num_experts, (rows, 1)), num_experts)
    x = torch.randn(rows, in_features, dtype=dtype)

    def bag():
        with torch.no_grad():
            return bag_mixture(x.unsqueeze(1), plan.expert_index.unsqueeze(1), weight)

    def grouped():
        with torch.no_grad():
            return _GROUPED_MM(x, weight, offs=plan.offsets)

    difference = (bag() - grouped()).abs().max().item()
    return {"grouped": grouped, "bag": bag}, _bag_wins(plan.token_index.shape[0], weight), difference


def moeut_forward_report(args):
    """MoEUT-44M (or a tiny MoEUT) forwards without autograd, with and without the unsorted bags."""
    overrides = dict(hidden_size=32, num_attention_heads=2, head_dim=8, num_hidden_layers=2) if args.tiny else {}
    config = MoEUTConfig.from_preset("moeut-44m", vocab_size=8000, **overrides)
    model = MoEUTForCausalLM(config).to(DTYPES[args.dtype]).eval()
    sorted_only = mock.patch.object(modeling_moeut, "bag_mixture_wins", return_value=False)
    results, rows = [], []
    for batch, tokens in FORWARD_SHAPES:
        ids = torch.randint(config.vocab_size, (batch, tokens))

        def unsorted():
            with torch.no_grad():
                return model(ids).logits

        def sorted_dispatch():
            with torch.no_grad(), sorted_only:
                return model(ids).logits

        difference = (unsorted() - sorted_dispatch()).abs().max().item()
        timings = time_interleaved({"sorted": sorted_dispatch, "unsorted": unsorted}, args.warmup, args.repeats)
        ratio = timings["unsorted"].median_s / timings["sorted"].median_s
        per_expert = batch * tokens * config.num_experts_per_tok / config.num_experts
        results.append({"batch": batch, "tokens": tokens, "ffn_choices_per_expert": per_expert,
                        "unsorted_over_sorted": ratio, "max_difference": difference,
                        **{impl: timing_dict(timing) for impl, timing in timings.items()}})  # fmt: skip
        rows.append([f"{batch} x {tokens}", f"{per_expert:.2f}", fmt_us(timings["sorted"]),
                     fmt_us(timings["unsorted"]), f"{ratio:.2f}", f"{difference:.1e}",
                     fmt_load(timings["unsorted"])])  # fmt: skip
    notes = [f"dtype={args.dtype}; {'a tiny MoEUT' if args.tiny else 'MoEUT-44M'}, random weights, uncached forwards."]
    header = ["batch x tokens", "FFN choices per expert", "sorted median (min) µs", "unsorted median (min) µs",
              "unsorted / sorted", "max |difference|", "foreign load"]  # fmt: skip
    payload = {"args": vars(args), "results": results}
    write_report("MoEUT forward without autograd: unsorted bags vs the sorted dispatch", header, rows, payload, args,
                 notes)  # fmt: skip


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one tiny shape, for a smoke test")
    parser.add_argument("--moeut-forward", action="store_true",
                        help="time whole MoEUT-44M forwards: unsorted bags vs the sorted dispatch")  # fmt: skip
    args = parser.parse_args()
    setup(args.threads, args.seed, args.malloc, args.device)
    if args.moeut_forward:
        return moeut_forward_report(args)
    if _GROUPED_MM is None:
        raise SystemExit("this torch build has no grouped_mm: nothing to compare the embedding_bag path with")
    results, rows, largest_difference = [], [], 0.0
    for name, (num_experts, in_features, out_features) in (TINY if args.tiny else SHAPES).items():
        for per_expert in ROWS_PER_EXPERT:
            count = max(1, round(per_expert * num_experts))
            fns, takes_bag, difference = projection_functions(
                num_experts, in_features, out_features, count, DTYPES[args.dtype]
            )
            largest_difference = max(largest_difference, difference)
            timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
            ratio = timings["grouped"].median_s / timings["bag"].median_s
            results.append({"shape": name, "experts": num_experts, "in": in_features, "out": out_features,
                            "rows": count, "taken": "bag" if takes_bag else "grouped", "grouped_over_bag": ratio,
                            **{impl: timing_dict(timing) for impl, timing in timings.items()}})  # fmt: skip
            rows.append([name, f"{num_experts} x {in_features} x {out_features}", f"{count / num_experts:.2f}",
                         fmt_us(timings["grouped"]), fmt_us(timings["bag"]), f"{ratio:.2f}",
                         "bag" if takes_bag else "grouped", fmt_load(timings["bag"])])  # fmt: skip
    notes = [
        f"dtype={args.dtype}; one projection per row, rows spread over the experts at random; "
        f"max |bag - grouped| over all cases: {largest_difference:.1e} (the same products, summed in another order)."
    ]
    header = ["shape", "experts x in x out", "rows per expert", "grouped_mm median (min) µs", "bag median (min) µs",
              "grouped / bag", "taken", "foreign load"]  # fmt: skip
    payload = {"args": vars(args), "results": results, "max_difference": largest_difference}
    write_report("Dispatch without autograd: embedding_bag vs grouped_mm", header, rows, payload, args, notes)


if __name__ == "__main__":
    main()
