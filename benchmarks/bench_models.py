"""Every architecture against its dense baseline, at CPU-sized shapes, with the analytic cost beside the time.

    python -m benchmarks.bench_models --json models.json --markdown models.md [--dtype bf16]
    OMP_NUM_THREADS=1 python -m benchmarks.bench_models --threads 1 --tiny --repeats 1   # smoke test

Pairs (the baseline first; times measured alternately in the same run; speed-ups are baseline time / model time):
- MoM with sequential and with learned (K=1) routing vs HF `GPT2LMHeadModel` of the same shape and unrolled depth;
- MoEUT-44M (`MoEUTConfig.from_preset("moeut-44m")`) vs a dense pre-LN GPT-2 of its depth and width, with an
  untied head like MoEUT's, MLP widened to match its parameters (`bench_moeut.matched_gpt2`);
- a MoEUT-244M-shaped layer stack (the preset's two shared layers applied `--stack-layers` times instead of 18) vs
  as many layers of the dense GPT-2 matched to the full 244M preset (d=1024, MLP ~4096 wide): per layer
  application, the two models' costs are the full models' (both keep their full-size output head, a larger share of
  a 4-layer stack than of the full models);
- a MoLM-shaped ModuleFormer (16 attention experts, k=2; 32 FFN experts, k=2; fewer, narrower layers) vs a dense
  GPT-2 of equal non-embedding parameters (`bench_moduleformer.build_dense`).

Per model: training step (forward + backward) tokens/s, activation memory (bytes autograd saves for backward in one
step, the part of training memory that grows with the batch), prefill tokens/s (batch 1), cached greedy decoding
tokens/s at batch 1 and 8 (the time of `generate`, its prompt's prefill included), forward FLOPs per token
(counted by `torch.utils.flop_counter` on a training-length forward: matmuls, the dispatch's grouped matmuls and
attention, so shared layers count once per application), the training step's achieved TFLOP/s (its forward and
backward FLOPs, counted the same way, times its tokens/s; with `--peak-tflops`, also as the model FLOP utilisation)
and KV-cache bytes per token (measured on the model's own cache after a prefill).

On a GPU (bf16; `--peak-tflops` is the card's dense bf16 peak, e.g. 989 for an H100/H200 SXM):

    python -m benchmarks.bench_models --device cuda --dtype bf16 --peak-tflops 989 --batch 16 --seq 1024

`--scaling` measures instead how the training step's time per token grows with the sequence length (256 to 2048
tokens, batch `max(1, --scaling-tokens // T)`: a step holds `--scaling-tokens` tokens, or one sequence of T where T
is longer): the attention's share grows with the length, and stick-breaking (ModuleFormer) is a different kernel
from the baselines' SDPA.

    python -m benchmarks.bench_models --scaling --json scaling.json --markdown scaling.md
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import argparse
import gc
import math
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_moduleformer, bench_moeut, bench_mom
from benchmarks.common import (
    DTYPES,
    FOREIGN_LOAD_WARNING,
    build_parser,
    count_parameters,
    greedy_decode,
    non_embedding_parameters,
    prefill,
    setup,
    synchronize,
    time_interleaved,
    timing_dict,
    train_step,
    write_report,
)
from modeling_mom.shared_modeling import CACHE_FIELD


def pairs(args) -> dict[str, tuple]:
    """name -> (baseline builder, [(model name, builder), ...]); builders are deferred so one pair is in memory."""
    dtype = DTYPES[args.dtype]
    positions = max(1024, *args.scaling_seqs) if args.scaling else 1024  # learned position tables
    mom_args = argparse.Namespace(vocab=args.vocab, hidden=args.mom_hidden, heads=args.mom_hidden // 64,
                                  layers=args.mom_layers, modules=args.mom_modules, enable_skip=False,
                                  dtype=args.dtype, positions=positions)  # fmt: skip
    moeut_args = argparse.Namespace(vocab=args.vocab, tiny=args.tiny)
    mf_args = argparse.Namespace(vocab=args.vocab, hidden=args.mf_hidden, layers=args.mf_layers, dtype=args.dtype)

    def moeut():
        return bench_moeut.MoEUTForCausalLM(bench_moeut.moeut_config(moeut_args)).to(dtype)

    def moeut_dense():
        return bench_moeut.matched_gpt2(bench_moeut.moeut_config(moeut_args), heads=4, positions=positions).to(dtype)

    def moeut_244m():
        return bench_moeut.MoEUTForCausalLM(bench_moeut.stack_244m_config(moeut_args, args.stack_layers)).to(dtype)

    def moeut_244m_dense():
        full = bench_moeut.stack_244m_config(moeut_args, 4 if args.tiny else 18)
        return bench_moeut.matched_gpt2(full, heads=4, positions=positions, layers=args.stack_layers).to(dtype)

    def moduleformer():
        return bench_moduleformer.build_moduleformer(mf_args)

    def moduleformer_dense():
        return bench_moduleformer.build_dense(mf_args, non_embedding_parameters(moduleformer()))

    return {
        "mom": (lambda: bench_mom.build_gpt2(mom_args, args.mom_layers),
                [("mom-sequential", lambda: bench_mom.build_mom(mom_args, "sequential")),
                 ("mom-learned", lambda: bench_mom.build_mom(mom_args, "learned"))]),
        "moeut": (moeut_dense, [("moeut-44m", moeut)]),
        "moeut-244m": (moeut_244m_dense, [(f"moeut-244m-{args.stack_layers}-layers", moeut_244m)]),
        "moduleformer": (moduleformer_dense, [("moduleformer", moduleformer)]),
    }  # fmt: skip


def activation_bytes(model, input_ids) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (each storage counted once)."""
    seen = {}

    def pack(tensor):
        if tensor.device.type != "meta":
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    return sum(size for pointer, size in seen.items() if pointer not in parameters)


def kv_bytes_per_token(model, prompt) -> float:
    """Bytes the model's KV cache holds per token, after a prefill of `prompt` (batch 1)."""
    model.eval()
    with torch.no_grad():
        cache = getattr(model(input_ids=prompt, use_cache=True), CACHE_FIELD)
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
    return total / prompt.shape[1]


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """`[S, in] x [E, in, out]` (the dispatch's forward): 2 S in out."""
    return 2 * a_shape[0] * a_shape[-1] * b_shape[-1]


def _embedding_bag_flops(weight_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    """The dispatch's decoding path, a weighted `embedding_bag`: a multiply and an add per gathered feature."""
    return 2 * math.prod(indices_shape) * weight_shape[-1]


def _cpu_sdpa_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """Scores and mixing, `4 B H T S D`, counted over the full square as torch counts its other SDPA kernels."""
    return 4 * math.prod(q_shape[:-1]) * k_shape[-2] * q_shape[-1]


def _cpu_sdpa_backward_flops(grad_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """The scores recomputed and the gradients of the probabilities, q, k and v: five products, `10 B H T S D`."""
    return 10 * math.prod(q_shape[:-1]) * k_shape[-2] * q_shape[-1]


FLOP_FORMULAS = {
    torch.ops.aten._grouped_mm: _grouped_mm_flops,
    torch.ops.aten._embedding_bag_forward_only: _embedding_bag_flops,
    torch.ops.aten._embedding_bag: _embedding_bag_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def forward_flops_per_token(model, input_ids) -> float:
    """Forward FLOPs per token, counted by `torch.utils.flop_counter` on one forward of `input_ids` (matmuls, the
    dispatch's grouped matmuls and attention; a shared layer counts once per application)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(input_ids=input_ids)
    return counter.get_total_flops() / input_ids.numel()


def train_flops_per_token(model, input_ids) -> float:
    """FLOPs per token of one training step (forward and backward of the LM loss), counted as the forward's are;
    the numerator of the step's model FLOP utilisation. Both count the products that run, zero padding included
    (MoEUT-44M's 82-wide heads are padded to 84 in training: 2% more FLOPs in its V and O experts)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        train_step(model, input_ids)()
    return counter.get_total_flops() / input_ids.numel()


def time_pair(baseline_fn, models, args) -> list[dict]:
    """Train step, prefill and decoding of the baseline and its models, alternately; plus their analytic costs."""
    built = {"baseline": baseline_fn(), **{name: fn() for name, fn in models}}
    vocab = next(iter(built.values())).config.vocab_size
    train_ids = torch.randint(vocab, (args.batch, args.seq))
    prompt = torch.randint(1, vocab, (1, args.prompt))
    results = {name: {"parameters": count_parameters(m)} for name, m in built.items()}
    for name, model in built.items():
        results[name]["forward_flops_per_token"] = forward_flops_per_token(model, train_ids)
        results[name]["train_flops_per_token"] = train_flops_per_token(model, train_ids)
        results[name]["kv_cache_bytes_per_token"] = kv_bytes_per_token(model, prompt)
        results[name]["activation_bytes"] = activation_bytes(model, train_ids)
        gc.collect()
    measurements = {
        "train": (lambda m: train_step(m, train_ids), args.batch * args.seq),
        "prefill": (lambda m: prefill(m, prompt), args.prompt),
        "decode_b1": (lambda m: greedy_decode(m, prompt, args.new_tokens), args.new_tokens),
        "decode_b8": (lambda m: greedy_decode(m, prompt.expand(8, -1), args.new_tokens),
                      8 * args.new_tokens),
    }  # fmt: skip
    for what, (make, tokens) in measurements.items():
        timings = time_interleaved({n: make(m) for n, m in built.items()}, warmup=args.warmup, repeats=args.repeats)
        for name, timing in timings.items():
            results[name][what] = {**timing_dict(timing), "tokens_per_s": tokens / timing.median_s}
    for values in results.values():
        values["train"]["tflops"] = values["train_flops_per_token"] * values["train"]["tokens_per_s"] / 1e12
        if args.peak_tflops:
            values["train"]["model_flop_utilisation"] = values["train"]["tflops"] / args.peak_tflops
    del built
    gc.collect()
    return [{"model": name, **values} for name, values in results.items()]


def scaling(pair: str, baseline_fn, models, args) -> list[dict]:
    """Training step time per token of the baseline and its models at each of `args.scaling_seqs`, alternately."""
    built = {"baseline": baseline_fn(), **{name: fn() for name, fn in models}}
    vocab = next(iter(built.values())).config.vocab_size
    results = []
    for seq in args.scaling_seqs:
        batch = max(1, args.scaling_tokens // seq)
        input_ids = torch.randint(vocab, (batch, seq))
        steps = {name: train_step(model, input_ids) for name, model in built.items()}
        for name, timing in time_interleaved(steps, warmup=args.warmup, repeats=args.repeats).items():
            results.append({"pair": pair, "model": name, "seq": seq, "batch": batch, **timing_dict(timing),
                            "us_per_token": timing.median_s / input_ids.numel() * 1e6})  # fmt: skip
    del built, steps
    gc.collect()
    return results


def scaling_report(results: list[dict], args) -> None:
    per_token = {(r["pair"], r["model"], r["seq"]): r["us_per_token"] for r in results}
    first = args.scaling_seqs[0]
    rows = [
        [r["pair"], r["model"], r["seq"], r["batch"], f"{r['us_per_token']:.0f}",
         f"{r['us_per_token'] / per_token[(r['pair'], 'baseline', r['seq'])]:.2f}",
         f"{r['us_per_token'] / per_token[(r['pair'], r['model'], first)]:.2f}", fmt_foreign_load(r["foreign_load"])]
        for r in results
    ]  # fmt: skip
    notes = [
        f"dtype={args.dtype}; training step (forward + backward) at each length T with batch max(1, "
        f"{args.scaling_tokens} // T); the models of the main table.",
        f"vs baseline: the model's time per token / its baseline's at the same T (< 1: faster); growth: the model's "
        f"time per token / its own at T={first}.",
    ]
    header = ["pair", "model", "T", "batch", "µs/token", "vs baseline", f"growth vs T={first}", "foreign load"]
    write_report("Training time per token against sequence length", header, rows,
                 {"args": vars(args), "results": results}, args, notes)  # fmt: skip


def memory_report(all_pairs: dict, args) -> None:
    """The activation memory of every model of `args.pairs` (one training forward each) and its ratio to its
    baseline's; models are built one at a time."""
    rows, results = [], []
    for pair in args.pairs:
        baseline_fn, models = all_pairs[pair]
        base = None
        for name, fn in [("baseline", baseline_fn), *models]:
            model = fn()
            train_ids = torch.randint(model.config.vocab_size, (args.batch, args.seq))
            size, parameters = activation_bytes(model, train_ids), count_parameters(model)
            base = size if base is None else base
            results.append({"pair": pair, "model": name, "parameters": parameters, "activation_bytes": size})
            rows.append([pair, name, f"{parameters / 1e6:.1f}M", f"{size / 2**20:.0f}", f"{size / base:.2f}"])
            del model
            gc.collect()
    notes = [
        f"dtype={args.dtype}; training batch {args.batch} x {args.seq}; the models of the main table.",
        "Activation memory: bytes of the tensors autograd saves for backward in one training forward (each storage "
        "once, parameters excluded).",
    ]
    header = ["pair", "model", "params", "activations MiB", "vs baseline"]
    write_report("Activation memory of a training step", header, rows, {"args": vars(args), "results": results},
                 args, notes, timed=False)  # fmt: skip


def profile_training_step(name: str, model, args, rows: int = 10) -> str:
    """torch.profiler's table of the `rows` operators with the most self time (on the GPU with `--device cuda`, else
    on the CPU) in one training step (after one untimed step), to show where the time goes; with the step's wall
    time with and without the profiler."""
    step = train_step(model, torch.randint(model.config.vocab_size, (args.batch, args.seq)))
    step()
    on_cuda = torch.get_default_device().type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    plain = time.perf_counter() - start
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        step()
        synchronize()
        profiled = time.perf_counter() - start
    sort_by = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    return (
        f"### {name}: one training step, batch {args.batch} x {args.seq}, {args.dtype}\n\n"
        f"Step wall time {plain:.2f} s without the profiler, {profiled:.2f} s with it.\n\n```\n{table}```\n"
    )


def fmt_foreign_load(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.2f}" + (" ⚠" if load > FOREIGN_LOAD_WARNING else "")


def main():
    parser = build_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--pairs", nargs="+", choices=["mom", "moeut", "moeut-244m", "moduleformer"],
                        help="default: all but moeut-244m with --scaling, all otherwise")  # fmt: skip
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary of every model (default 8000)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--mom-hidden", type=int, default=768)
    parser.add_argument("--mom-layers", type=int, default=6, help="GPT-2 depth = MoM unrolled depth (default 6)")
    parser.add_argument("--mom-modules", type=int, default=4)
    parser.add_argument("--mf-hidden", type=int, default=512, help="ModuleFormer width (MoLM: 1024)")
    parser.add_argument("--mf-layers", type=int, default=4, help="ModuleFormer depth (MoLM: 24)")
    parser.add_argument("--stack-layers", type=int, default=4,
                        help="layer applications of the MoEUT-244M-shaped stack (default 4: each shared layer twice)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak TFLOP/s in --dtype: adds each training step's model FLOP utilisation")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: print the profiler's top-10 operators of one training step per model",
    )
    parser.add_argument("--scaling", action="store_true",
                        help="instead of the main table: training time per token against the sequence length")
    parser.add_argument("--memory", action="store_true",
                        help="instead of the main table: only each model's activation memory (seconds, not minutes)")
    parser.add_argument("--scaling-seqs", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--scaling-tokens", type=int, default=1024, help="tokens per training step with --scaling")
    args = parser.parse_args()
    if args.pairs is None:
        args.pairs = ["mom", "moeut", "moduleformer"] + ([] if args.scaling else ["moeut-244m"])
    if args.stack_layers < 2 or args.stack_layers % 2:
        parser.error(f"--stack-layers={args.stack_layers}: must be a positive multiple of 2 (the shared layers).")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops={args.peak_tflops}: must be a positive number of TFLOP/s.")
    if min(args.scaling_seqs) < 1 or args.scaling_tokens < 1:
        parser.error(f"--scaling-seqs {args.scaling_seqs} and --scaling-tokens {args.scaling_tokens} must be >= 1.")
    if args.tiny:
        args.scaling_seqs, args.scaling_tokens = [16, 32], 32
        args.batch, args.seq, args.prompt, args.new_tokens = 2, 16, 8, 2
        args.mom_hidden, args.mom_layers, args.mom_modules, args.mf_hidden, args.mf_layers = 64, 3, 2, 64, 2
    setup(args.threads, args.seed, args.malloc, args.device)
    all_pairs = pairs(args)
    if args.profile:
        report = [profile_training_step(name, fn(), args) for pair in args.pairs
                  for name, fn in [(f"{pair} baseline", all_pairs[pair][0]), *all_pairs[pair][1]]]  # fmt: skip
        print("\n".join(report))
        if args.markdown:
            Path(args.markdown).write_text("\n".join(report))
        return
    if args.memory:
        memory_report(all_pairs, args)
        return
    if args.scaling:
        scaling_report([r for pair in args.pairs for r in scaling(pair, *all_pairs[pair], args)], args)
        return
    results, rows = {}, []
    for pair in args.pairs:
        baseline_fn, models = all_pairs[pair]
        results[pair] = time_pair(baseline_fn, models, args)
        base = results[pair][0]
        for r in results[pair]:
            ratio = {what: base[what]["median_s"] / r[what]["median_s"] for what in ("train", "decode_b1")}
            rows.append([
                pair, "baseline" if r is base else r["model"], f"{r['parameters'] / 1e6:.1f}M",
                f"{r['train']['tokens_per_s']:.0f}", f"{ratio['train']:.2f}", f"{r['activation_bytes'] / 2**20:.0f}",
                f"{r['prefill']['tokens_per_s']:.0f}", f"{r['decode_b1']['tokens_per_s']:.1f}",
                f"{ratio['decode_b1']:.2f}",
                f"{r['decode_b8']['tokens_per_s']:.1f}", f"{r['forward_flops_per_token'] / 1e6:.1f}",
                f"{r['train']['tflops']:.3f}", *([f"{100 * r['train']['model_flop_utilisation']:.1f}%"]
                                                 if args.peak_tflops else []),
                f"{r['kv_cache_bytes_per_token'] / 1024:.1f}", fmt_foreign_load(r["train"]["foreign_load"]),
            ])  # fmt: skip
    notes = [
        (
            f"dtype={args.dtype}; vocabulary {args.vocab}; training batch {args.batch} x {args.seq}; prefill batch 1 x "
            f"{args.prompt}; decoding {args.new_tokens} new tokens after that prompt, batch 1 and 8. MoM: width "
            f"{args.mom_hidden}, {args.mom_layers} unrolled layers, {args.mom_modules} modules per pool. ModuleFormer: "
            f"width {args.mf_hidden}, {args.mf_layers} layers."
        ),
        (
            "Speed-up columns are baseline time / model time (> 1: the model is faster). Activation memory: bytes "
            "saved for backward in one training step. FLOPs: forward, per token. Train TFLOP/s: the FLOPs of one "
            "training step (forward + backward, counted like the forward's) times its tokens/s"
            + (f"; MFU: that over the peak of {args.peak_tflops} TFLOP/s given by --peak-tflops." if args.peak_tflops
               else ".")
        ),
    ]
    header = ["pair", "model", "params", "train tok/s", "train speed-up", "activations MiB", "prefill tok/s",
              "decode b1 tok/s", "decode b1 speed-up", "decode b8 tok/s", "fwd MFLOP/token", "train TFLOP/s",
              *(["train MFU"] if args.peak_tflops else []), "KV KiB/token", "foreign load (train)"]  # fmt: skip
    write_report("Architectures vs dense baselines", header, rows, {"args": vars(args), "results": results}, args,
                 notes)  # fmt: skip


if __name__ == "__main__":
    main()
