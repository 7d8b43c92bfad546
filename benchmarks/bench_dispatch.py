"""Expert dispatch speed: our shared dispatch against the dense matmul limit and transformers' own kernels.

    python -m benchmarks.bench_dispatch --json dispatch.json --markdown dispatch.md [--dtype bf16]
    OMP_NUM_THREADS=1 python -m benchmarks.bench_dispatch --threads 1 --tiny --repeats 1   # smoke test

One expert feed-forward layer (`MoEUTExperts`: sort, gather, grouped matmul, activation, gate, grouped matmul,
weighted scatter-add; the module every architecture's FFN experts share) on fixed random top-k choices, timed as:
- `ours`: the shared dispatch (`moe_dispatch.py`), the "eager" experts implementation;
- `hf_grouped_mm`: transformers' `grouped_mm` experts kernel on the same module and weights
  (`config._experts_implementation = "grouped_mm"`);
- `loop`: a plain loop over the experts chosen in the batch (index_select, two matmuls, index_add);
- `dense`: a dense FFN `d -> k * e -> d` with the same useful FLOPs (the machine's practical limit).
Useful FLOPs: forward `4 T k d e`, forward + backward 3x that. "% of dense" compares achieved GFLOP/s.

Cases: the MoEUT-244M sigma-MoE FFN (d=1024, 387 experts of 128, k=16), the MoLM (ModuleFormer) FFN (d=1024,
32 experts of 2048, k=2), decoding (T = 1, 2, 4, 8 tokens at the MoEUT shape, forward only), and the number of experts
at fixed active compute (k x e = 2048: e = 128, 64, 32 with k = 16, 32, 64; E = 387 * 128 / e).
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import torch
from torch import nn

from benchmarks.common import DTYPES, build_parser, fmt_load, fmt_ms, setup, time_interleaved, timing_dict, write_report
from modeling_mom import MoEUTConfig
from modeling_mom.modeling_moeut import MoEUTExperts

SHAPES = {  # name: (tokens, d, experts, expert width, k, activation)
    "moeut-244m-ffn": (1024, 1024, 387, 128, 16, "relu"),
    "molm-ffn": (1024, 1024, 32, 2048, 2, "gelu_new"),
    "experts-x2 (e=64)": (1024, 1024, 774, 64, 32, "relu"),
    "experts-x4 (e=32)": (1024, 1024, 1548, 32, 64, "relu"),
}
DECODE_TOKENS = (1, 2, 4, 8)
TINY = (64, 64, 24, 16, 4, "relu")


def build_layer(d: int, num_experts: int, width: int, k: int, act: str, dtype) -> MoEUTExperts:
    config = MoEUTConfig(hidden_size=d, num_experts=num_experts, num_experts_per_tok=k, moe_intermediate_size=width,
                         hidden_act=act, num_attention_heads=1, head_dim=8, vocab_size=8)  # fmt: skip
    experts = MoEUTExperts(config).to(dtype)
    experts.has_bias = False
    with torch.no_grad():
        experts.up_proj.normal_(0, d**-0.5)
        experts.down_proj.normal_(0, width**-0.5)
    return experts


def loop_forward(experts: MoEUTExperts, x, index, gates):
    """A plain loop over the experts chosen in the batch: the reference a fast decoding path must not lose to."""
    out = torch.zeros_like(x)
    flat, flat_gates = index.reshape(-1), gates.reshape(-1, 1)
    for e in flat.unique().tolist():
        rows = (flat == e).nonzero().squeeze(1)
        tokens = rows // index.shape[1]
        h = experts.act_fn(x.index_select(0, tokens) @ experts.up_proj[e]) * flat_gates.index_select(0, rows)
        out.index_add_(0, tokens, h @ experts.down_proj[e])
    return out


def case_functions(shape, dtype, backward: bool, with_loop: bool):
    tokens, d, num_experts, width, k, act = shape
    experts = build_layer(d, num_experts, width, k, act, dtype)
    dense = nn.Sequential(nn.Linear(d, k * width, bias=False), nn.ReLU(), nn.Linear(k * width, d, bias=False))
    dense = dense.to(dtype)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=backward)
    index = torch.rand(tokens, num_experts).topk(k, dim=-1).indices
    gates = torch.rand(tokens, k, dtype=dtype)
    grad = torch.randn(tokens, d, dtype=dtype)

    def run(forward):
        def step():
            if backward:
                experts.zero_grad(set_to_none=True)
                dense.zero_grad(set_to_none=True)
                forward().backward(grad)
            else:
                with torch.no_grad():
                    forward()

        return step

    def implementation(name):
        def forward():
            experts.config._experts_implementation = name
            return experts(x, index, gates)

        return forward

    fns = {
        "dense": run(lambda: dense(x)),
        "ours": run(implementation("eager")),
        "hf_grouped_mm": run(implementation("grouped_mm")),
    }
    if with_loop:
        fns["loop"] = run(lambda: loop_forward(experts, x, index, gates))
    flops = 4 * tokens * k * d * width * (3 if backward else 1)
    return fns, flops


def check_equal(shape, dtype) -> float:
    """max |ours - loop| on one input: the figures compare implementations of the same function."""
    tokens, d, num_experts, width, k, act = shape
    experts = build_layer(d, num_experts, width, k, act, dtype)
    x = torch.randn(tokens, d, dtype=dtype)
    index = torch.rand(tokens, num_experts).topk(k, dim=-1).indices
    gates = torch.rand(tokens, k, dtype=dtype)
    with torch.no_grad():
        experts.config._experts_implementation = "eager"
        return (experts(x, index, gates) - loop_forward(experts, x, index, gates)).abs().max().item()


def measure(name, shape, args, backward, with_loop):
    fns, flops = case_functions(shape, DTYPES[args.dtype], backward, with_loop)
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    dense_gflops = flops / timings["dense"].median_s / 1e9
    result = {"case": name, "shape": shape, "pass": "fwd+bwd" if backward else "fwd", "useful_gflop": flops / 1e9}
    rows = []
    for impl, timing in timings.items():
        gflops = flops / timing.median_s / 1e9
        result[impl] = {**timing_dict(timing), "gflops": gflops, "fraction_of_dense": gflops / dense_gflops}
        vs_hf = timings["hf_grouped_mm"].median_s / timing.median_s
        rows.append([name, result["pass"], impl, fmt_ms(timing), fmt_load(timing), f"{gflops:.1f}",
                     f"{100 * gflops / dense_gflops:.0f}%", f"{vs_hf:.2f}"])  # fmt: skip
    return result, rows


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--cases", nargs="+", choices=[*SHAPES, "decode"], default=[*SHAPES, "decode"])
    args = parser.parse_args()
    setup(args.threads, args.seed)
    dtype = DTYPES[args.dtype]
    results, rows = [], []
    for name in args.cases:
        if name == "decode":
            base = TINY if args.tiny else SHAPES["moeut-244m-ffn"]
            for tokens in DECODE_TOKENS:
                result, case_rows = measure(f"decode T={tokens}", (tokens, *base[1:]), args, False, True)
                results.append(result)
                rows += case_rows
            continue
        shape = TINY if args.tiny else SHAPES[name]
        for backward in (False, True):
            result, case_rows = measure(name, shape, args, backward, with_loop=False)
            results.append(result)
            rows += case_rows
    difference = check_equal(TINY if args.tiny else SHAPES["moeut-244m-ffn"], dtype)
    notes = [
        f"dtype={args.dtype}; shapes (tokens, d, experts, expert width, k, activation): "
        f"{ {n: s for n, s in SHAPES.items() if n in args.cases} if not args.tiny else TINY}.",
        f"ours vs the loop on one input: max |difference| = {difference:.2e} (same function, summation order).",
        "% of dense: achieved useful GFLOP/s over the dense FFN's in the same run; vs HF: hf_grouped_mm time / this "
        "implementation's time (> 1: faster than transformers' kernel).",
    ]
    header = ["case", "pass", "implementation", "median (min) ms", "foreign load", "useful GFLOP/s", "% of dense",
              "vs HF grouped_mm"]  # fmt: skip
    payload = {"args": vars(args), "results": results, "max_difference_vs_loop": difference}
    write_report("Expert dispatch vs dense matmul and transformers' kernels", header, rows, payload, args, notes)


if __name__ == "__main__":
    main()
