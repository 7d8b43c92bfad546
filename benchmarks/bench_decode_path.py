"""The dispatch's two paths without autograd: one weighted `embedding_bag` against `grouped_mm`, by rows per expert.

    python -m benchmarks.bench_decode_path --json decode_path.json --markdown decode_path.md
    OMP_NUM_THREADS=1 python -m benchmarks.bench_decode_path --threads 1 --repeats 1 --tiny   # smoke test

`moe_dispatch.grouped_linear` computes a projection through `embedding_bag` (each row times its expert's weight,
reading that weight once per row) when its experts have at most 2^18 weights and at most 6 rows each on average,
and through `grouped_mm` (each expert's weight read once for all its rows, one product per expert) otherwise.
This measures both on the same sorted rows, one projection at a time, at each architecture's expert shapes, so the
limits can be checked on another machine: "grouped / bag" > 1 means the bag is faster, and "taken" says which path
the dispatch picks there.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import torch

from benchmarks.common import DTYPES, Timing, build_parser, fmt_load, setup, time_interleaved, timing_dict, write_report
from modeling_mom.moe_dispatch import _GROUPED_MM, _bag_linear, _bag_wins, plan_dispatch

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
            return _bag_linear(x, weight, plan)

    def grouped():
        with torch.no_grad():
            return _GROUPED_MM(x, weight, offs=plan.offsets)

    difference = (bag() - grouped()).abs().max().item()
    return {"grouped": grouped, "bag": bag}, _bag_wins(plan, weight), difference


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one tiny shape, for a smoke test")
    args = parser.parse_args()
    setup(args.threads, args.seed, args.malloc)
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
