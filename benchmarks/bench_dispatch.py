"""Expert dispatch speed: our shared dispatch against the dense matmul limit and transformers' own kernels.

    python -m benchmarks.bench_dispatch --json dispatch.json --markdown dispatch.md [--dtype bf16]
    OMP_NUM_THREADS=1 python -m benchmarks.bench_dispatch --threads 1 --tiny --repeats 1   # smoke test

One expert feed-forward layer (`MoEUTExperts`: sort, gather, grouped matmul, activation, gate, grouped matmul,
weighted scatter-add; the module every architecture's FFN experts share) on fixed random top-k choices, timed as:
- `ours`: the shared dispatch (`moe_dispatch.py`), the "eager" experts implementation;
- `hf_grouped_mm`: transformers' `grouped_mm` experts kernel on the same module and weights
  (`config._experts_implementation = "grouped_mm"`);
- `loop`: a plain loop over the experts chosen in the batch (index_select, two matmuls, index_add; the weights are
  unbound once, so its backward is linear in the number of experts);
- `dense`: a dense FFN `d -> k * e -> d` with the same useful FLOPs (the machine's practical limit);
- on CUDA with Triton, `ours_without_triton`: the shared dispatch with its Triton kernels switched off
  (`MODELING_MOM_TRITON=0`: torch's `grouped_mm`, or one matmul per expert where torch has no fused kernel).
Useful FLOPs: forward `4 T k d e`, forward + backward 3x that. "% of dense" compares achieved GFLOP/s.

Cases: the MoEUT-244M sigma-MoE FFN (d=1024, 387 experts of 128, k=16), the MoLM (ModuleFormer) FFN (d=1024,
32 experts of 2048, k=2), the MoEUT-244M SwitchHead value and output experts (4 heads x 10 experts of
1024 -> 128 and back, k=2 per head; no transformers kernel exists for these single projections, and `dense` is one
`d -> H k dh -> d` pair of matmuls), decoding (T = 1, 2, 4, 8 tokens at the MoEUT shape, forward only), and the number
of experts at fixed active compute (k x e = 2048: e = 128, 64, 32 with k = 16, 32, 64; E = 387 * 128 / e).
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import torch
from torch import nn
from transformers.utils import is_triton_available

from benchmarks.common import (
    DTYPES,
    build_parser,
    fmt_load,
    fmt_ms,
    setup,
    time_interleaved,
    timing_dict,
    without_triton,
    write_report,
)
from modeling_mom import MoEUTConfig
from modeling_mom.modeling_moeut import MoEUTAttention, MoEUTExperts

SHAPES = {  # name: (tokens, d, experts, expert width, k, activation)
    "moeut-244m-ffn": (1024, 1024, 387, 128, 16, "relu"),
    "molm-ffn": (1024, 1024, 32, 2048, 2, "gelu_new"),
    "moeut-244m-switchhead-vo": (1024, 1024, 40, 128, 2, "4 heads"),  # experts = heads x 10, width = head_dim
    "experts-x2 (e=64)": (1024, 1024, 774, 64, 32, "relu"),
    "experts-x4 (e=32)": (1024, 1024, 1548, 32, 64, "relu"),
}
SWITCHHEAD_HEADS = 4
DECODE_TOKENS = (1, 2, 4, 8)
TINY = (64, 64, 24, 16, 4, "relu")
TINY_SWITCHHEAD = (64, 64, 8, 16, 2, "4 heads")


def build_layer(d: int, num_experts: int, width: int, k: int, act: str, dtype) -> MoEUTExperts:
    config = MoEUTConfig(hidden_size=d, num_experts=num_experts, num_experts_per_tok=k, moe_intermediate_size=width,
                         hidden_act=act, num_attention_heads=1, head_dim=8, vocab_size=8)  # fmt: skip
    experts = MoEUTExperts(config).to(dtype)
    experts.has_bias = False
    with torch.no_grad():
        experts.up_proj.normal_(0, d**-0.5)
        experts.down_proj.normal_(0, width**-0.5)
    return experts


def loop_forward(up: tuple, down: tuple, act, x, index, gates):
    """A plain loop over the experts chosen in the batch: the reference a fast decoding path must not lose to.
    `up` / `down` are the unbound per-expert weights (indexing the `[E, ...]` parameter in the loop would make
    the backward quadratic in the number of experts)."""
    out = torch.zeros_like(x)
    flat, flat_gates = index.reshape(-1), gates.reshape(-1, 1)
    for e in flat.unique().tolist():
        rows = (flat == e).nonzero().squeeze(1)
        tokens = rows // index.shape[1]
        h = act(x.index_select(0, tokens) @ up[e]) * flat_gates.index_select(0, rows)
        out.index_add_(0, tokens, h @ down[e])
    return out


def random_choices(tokens: int, num_experts: int, k: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, k]` distinct uniformly random experts per token and `[T, k]` gates in (0, 1)."""
    index = torch.rand(tokens, num_experts).topk(k, dim=-1).indices
    return index, torch.rand(tokens, k, dtype=dtype)


def ffn_functions(shape, dtype, backward: bool):
    """The expert FFN (`MoEUTExperts`) through our dispatch, transformers' kernel and the loop; the dense FFN."""
    tokens, d, num_experts, width, k, act = shape
    experts = build_layer(d, num_experts, width, k, act, dtype)
    dense = nn.Sequential(nn.Linear(d, k * width, bias=False), nn.ReLU(), nn.Linear(k * width, d, bias=False))
    dense = dense.to(dtype)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=backward)
    index, gates = random_choices(tokens, num_experts, k, dtype)

    def implementation(name):
        def forward():
            experts.config._experts_implementation = name
            return experts(x, index, gates)

        return forward

    def loop():
        return loop_forward(experts.up_proj.unbind(0), experts.down_proj.unbind(0), experts.act_fn, x, index, gates)

    forwards = {"dense": lambda: dense(x), "ours": implementation("eager"),
                "hf_grouped_mm": implementation("grouped_mm"), "loop": loop}  # fmt: skip
    return forwards, [experts, dense], x, 4 * tokens * k * d * width


def switchhead_functions(shape, dtype, backward: bool):
    """SwitchHead's value and output experts: the model's own `MoEUTAttention._values` and `_output` (routers
    included, reading the same input), per head the gated sum of k value experts `d -> dh`, then the gated sum over
    heads of their k output experts `dh -> d`. The attention itself is left out; `loop` follows the same routing."""
    tokens, d, num_experts, head_dim, k, _ = shape
    heads = SWITCHHEAD_HEADS
    config = MoEUTConfig(hidden_size=d, num_attention_heads=heads, head_dim=head_dim, vocab_size=8,
                         num_attention_experts=num_experts // heads, num_attention_experts_per_tok=k)  # fmt: skip
    attention = MoEUTAttention(config).to(dtype)
    with torch.no_grad():
        attention.v_experts.normal_(0, d**-0.5)
        attention.o_experts.normal_(0, head_dim**-0.5)
        for router in (attention.v_router, attention.o_router):
            router.weight.normal_(0, d**-0.5)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=backward)
    with torch.no_grad():
        (_, v_gates, v_index), (_, o_gates, o_index) = attention.v_router(x), attention.o_router(x)

    def ours():
        return attention._output(attention._values(x, x, heads), x)

    def loop():
        v_up, o_down = attention.v_experts.unbind(0), attention.o_experts.unbind(0)
        values = torch.zeros(tokens * heads, head_dim, dtype=dtype)
        flat_v, flat_o = v_index.reshape(-1), o_index.reshape(-1)
        for e in flat_v.unique().tolist():
            pairs = (flat_v == e).nonzero().squeeze(1)
            rows = x.index_select(0, pairs // (heads * k)) @ v_up[e] * v_gates.reshape(-1, 1).index_select(0, pairs)
            values.index_add_(0, pairs // k, rows.to(dtype))
        out = torch.zeros(tokens, d, dtype=dtype)
        for e in flat_o.unique().tolist():
            pairs = (flat_o == e).nonzero().squeeze(1)
            rows = values.index_select(0, pairs // k) * o_gates.reshape(-1, 1).index_select(0, pairs).to(dtype)
            out.index_add_(0, pairs // (heads * k), rows @ o_down[e])
        return out

    dense_v = nn.Linear(d, heads * k * head_dim, bias=False).to(dtype)
    dense_o = nn.Linear(heads * k * head_dim, d, bias=False).to(dtype)
    forwards = {"dense": lambda: dense_o(dense_v(x)), "ours": ours, "loop": loop}
    return forwards, [attention, dense_v, dense_o], x, 4 * tokens * heads * k * d * head_dim


def case_functions(name: str, shape, dtype, backward: bool):
    """`{implementation: step}` (one forward, or forward + backward) and the useful FLOPs of one step."""
    build = switchhead_functions if "switchhead" in name else ffn_functions
    forwards, modules, x, flops = build(shape, dtype, backward)
    if x.is_cuda and is_triton_available():
        forwards["ours_without_triton"] = without_triton(forwards["ours"])
    grad = torch.randn(x.shape, dtype=dtype)

    def step(forward):
        def run():
            if backward:
                x.grad = None
                for module in modules:
                    module.zero_grad(set_to_none=True)
                forward().backward(grad)
            else:
                with torch.no_grad():
                    forward()

        return run

    return {impl: step(forward) for impl, forward in forwards.items()}, flops * (3 if backward else 1)


def check_equal(name: str, shape, dtype) -> float:
    """max |ours - loop| on one input: the figures compare implementations of the same function."""
    build = switchhead_functions if "switchhead" in name else ffn_functions
    forwards, *_ = build(shape, dtype, backward=False)
    with torch.no_grad():
        return (forwards["ours"]() - forwards["loop"]()).abs().max().item()


def measure(name, shape, args, backward):
    fns, flops = case_functions(name, shape, DTYPES[args.dtype], backward)
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    dense_gflops = flops / timings["dense"].median_s / 1e9
    result = {"case": name, "shape": shape, "pass": "fwd+bwd" if backward else "fwd", "useful_gflop": flops / 1e9}
    rows = []
    for impl, timing in timings.items():
        gflops = flops / timing.median_s / 1e9
        result[impl] = {**timing_dict(timing), "gflops": gflops, "fraction_of_dense": gflops / dense_gflops}
        vs_hf = f"{timings['hf_grouped_mm'].median_s / timing.median_s:.2f}" if "hf_grouped_mm" in timings else "n/a"
        vs_loop = timings["loop"].median_s / timing.median_s
        rows.append([name, result["pass"], impl, fmt_ms(timing), fmt_load(timing), f"{gflops:.1f}",
                     f"{100 * gflops / dense_gflops:.0f}%", vs_hf, f"{vs_loop:.2f}"])  # fmt: skip
    return result, rows


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--cases", nargs="+", choices=[*SHAPES, "decode"], default=[*SHAPES, "decode"])
    parser.add_argument("--tokens", type=int, help="tokens of every case but decoding (default 1024; a GPU needs more)")
    args = parser.parse_args()
    if args.tokens is not None and args.tokens < 1:
        parser.error(f"--tokens={args.tokens} must be >= 1.")
    setup(args.threads, args.seed, args.malloc, args.device)
    dtype = DTYPES[args.dtype]
    shapes = {name: (TINY_SWITCHHEAD if "switchhead" in name else TINY) if args.tiny else shape
              for name, shape in SHAPES.items()}  # fmt: skip
    if args.tokens is not None:
        shapes = {name: (args.tokens, *shape[1:]) for name, shape in shapes.items()}
    results, rows, differences = [], [], {}
    for name in args.cases:
        if name == "decode":
            for tokens in DECODE_TOKENS:
                result, case_rows = measure(f"decode T={tokens}", (tokens, *shapes["moeut-244m-ffn"][1:]), args, False)
                results.append(result)
                rows += case_rows
            continue
        for backward in (False, True):
            result, case_rows = measure(name, shapes[name], args, backward)
            results.append(result)
            rows += case_rows
        differences[name] = check_equal(name, shapes[name], dtype)
    notes = [
        f"dtype={args.dtype}; shapes (tokens, d, experts, expert width, k, activation): "
        f"{ {name: shapes[name] for name in args.cases if name in shapes} }.",
        "ours vs the loop on one input, max |difference| (same function, summation order): "
        + ", ".join(f"{name} {difference:.1e}" for name, difference in differences.items())
        + ".",
        "% of dense: achieved useful GFLOP/s over the dense layer's in the same run; vs HF / vs loop: that "
        "implementation's time over this one's (> 1: this one is faster).",
    ]
    header = ["case", "pass", "implementation", "median (min) ms", "foreign load", "useful GFLOP/s", "% of dense",
              "vs HF grouped_mm", "vs loop"]  # fmt: skip
    payload = {"args": vars(args), "results": results, "max_difference_vs_loop": differences}
    write_report("Expert dispatch vs dense matmul and transformers' kernels", header, rows, payload, args, notes)


if __name__ == "__main__":
    main()
