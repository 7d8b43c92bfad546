"""The dispatch's two paths without autograd: one weighted `embedding_bag` against `grouped_mm`, by rows per expert.

    python -m benchmarks.bench_decode_path --json decode_path.json --markdown decode_path.md
    python -m benchmarks.bench_decode_path --moeut-forward --repeats 30   # MoEUT-44M: unsorted bags vs sorted
    python -m benchmarks.bench_decode_path --feature-padding               # unaligned features: padded vs loop
    OMP_NUM_THREADS=1 python -m benchmarks.bench_decode_path --threads 1 --repeats 1 --tiny   # smoke test

`moe_dispatch.grouped_linear` computes a projection through `embedding_bag` (each row times its expert's weight,
reading that weight once per row) when its experts have at most 2^18 weights and at most 6 rows each on average,
and through `grouped_mm` (each expert's weight read once for all its rows, one product per expert) otherwise.
This measures both on the same sorted rows, one projection at a time, at each architecture's expert shapes, so the
limits can be checked on another machine: "grouped / bag" > 1 means the bag is faster, and "taken" says which path
the dispatch picks there.

`--feature-padding` compares instead, with and without autograd, the two paths of features `grouped_mm` cannot take
as they are (MoEUT-44M's 82-wide SwitchHead heads): `grouped_mm` on zero-padded operands and the per-expert loop,
by rows per expert; "loop / padded" > 1 means the padding is faster, and "taken" says which one the dispatch picks.

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
from modeling_mom.moe_dispatch import (
    _GROUPED_MM,
    _bag_wins,
    _feature_padded_grouped_mm,
    _feature_padding_wins,
    bag_mixture,
    plan_dispatch,
)

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
UNALIGNED_SHAPES = {"moeut-44m switchhead v": (32, 412, 82), "moeut-44m switchhead o": (32, 82, 412)}
UNALIGNED_ROWS_PER_EXPERT = (8, 16, 32, 64, 128, 256, 512)


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


def feature_padding_report(args):
    """Unaligned features, with and without autograd: `grouped_mm` on zero-padded operands vs the per-expert loop."""
    shapes = {"tiny": (6, 30, 18)} if args.tiny else UNALIGNED_SHAPES
    per_expert_counts = (2, 8) if args.tiny else UNALIGNED_ROWS_PER_EXPERT
    dtype = DTYPES[args.dtype]
    results, rows = [], []
    for name, (num_experts, in_features, out_features) in shapes.items():
        weight = (torch.randn(num_experts, in_features, out_features, dtype=dtype) * in_features**-0.5).requires_grad_()
        for per_expert, backward in [(count, grad) for grad in (False, True) for count in per_expert_counts]:
            plan = plan_dispatch(torch.randint(num_experts, (per_expert * num_experts, 1)), num_experts)
            x = torch.randn(per_expert * num_experts, in_features, dtype=dtype, requires_grad=True)
            grad = torch.randn(x.shape[0], out_features, dtype=dtype)

            def step(forward):
                def run():
                    x.grad = weight.grad = None
                    with torch.set_grad_enabled(backward):
                        out = forward(x, weight, plan)
                    if backward:
                        out.backward(grad)

                return run

            def loop(x, weight, plan):  # the dispatch's per-expert loop (the bag never: it may run without autograd)
                return torch.cat([xe @ we for xe, we in zip(x.split(plan.counts), weight.unbind(0))])

            fns = {"loop": step(loop), "padded": step(_feature_padded_grouped_mm)}
            timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
            ratio = timings["loop"].median_s / timings["padded"].median_s
            taken = "padded" if _feature_padding_wins(x, weight, plan, backward) else "loop"
            results.append({"shape": name, "rows_per_expert": per_expert, "backward": backward, "taken": taken,
                            "loop_over_padded": ratio,
                            **{impl: timing_dict(timing) for impl, timing in timings.items()}})  # fmt: skip
            rows.append([name, f"{num_experts} x {in_features} x {out_features}", per_expert,
                         "fwd+bwd" if backward else "fwd, no autograd", fmt_us(timings["loop"]),
                         fmt_us(timings["padded"]), f"{ratio:.2f}", taken, fmt_load(timings["padded"])])  # fmt: skip
    notes = [f"dtype={args.dtype}; one projection, rows = experts x rows per expert, each row's expert at random."]
    header = ["shape", "experts x in x out", "rows per expert", "pass", "loop median (min) µs",
              "padded median (min) µs", "loop / padded", "taken", "foreign load"]  # fmt: skip
    payload = {"args": vars(args), "results": results}
    write_report("Unaligned features: zero-padded grouped_mm vs the per-expert loop", header, rows, payload, args,
                 notes)  # fmt: skip


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
    parser.add_argument("--feature-padding", action="store_true",
                        help="unaligned features: zero-padded grouped_mm vs the per-expert loop")  # fmt: skip
    args = parser.parse_args()
    setup(args.threads, args.seed, args.malloc, args.device)
    if args.moeut_forward:
        return moeut_forward_report(args)
    if _GROUPED_MM is None:
        raise SystemExit("this torch build has no grouped_mm: nothing to compare the embedding_bag path with")
    if args.feature_padding:
        return feature_padding_report(args)
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
