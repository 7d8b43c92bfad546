"""Stick-breaking attention against causal `scaled_dot_product_attention` (issues 4 and 6): time and peak memory.

For each sequence length: SDPA (`is_causal=True`, PyTorch's fused kernel for the device), our blocked stick-breaking
kernel (`modeling_mom.stickbreaking_attention`, fp32 whatever the input dtype; in fwd+bwd also with
`recompute_weights=True`, its O(T x D)-memory form; on CUDA with Triton these run the fused Triton kernel, and the
"PyTorch" forms the blocked one) and, at short lengths, the naive
full-matrix log-space formula through plain autograd (moduleformer.md's reference: O(T x S) tensors, several of them
kept for backward). Forward alone (no autograd) and forward + backward; ratio = time / SDPA's time in the same run,
medians. Peak memory is measured after the timings, once per figure: the growth of the process's peak resident
set during one call (`/proc/self/status` VmHWM, reset through `/proc/self/clear_refs`), with glibc told to return
every block of 64 KiB or more to the system when freed, so that a freed temporary does not hide a later one; with
`--device cuda`, the growth of the peak of memory allocated on the device.

    python -m benchmarks.bench_attention --json attention.json --markdown attention.md
    OMP_NUM_THREADS=1 python -m benchmarks.bench_attention --tiny --threads 1   # smoke test (seconds)
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import ctypes
import gc

import torch
import torch.nn.functional as F
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
from modeling_mom.stickbreaking_attention import stick_breaking_attention

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def naive_stick_breaking(q, k, v):
    """The full-matrix log-space formula (official ModuleFormer variant): `[B, H, T, T]` tensors, plain autograd."""
    seq = q.shape[-2]
    logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    log_stay = F.logsigmoid(-logits).masked_fill(~allowed, 0.0)
    log_left = log_stay.flip(-1).cumsum(-1).flip(-1) - log_stay  # sum over nearer keys
    weights = (F.logsigmoid(logits) + log_left).exp().masked_fill(~allowed, 0.0)
    return (weights @ v.float()).to(v.dtype)


IMPLEMENTATIONS = {
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "stick-breaking": lambda q, k, v: stick_breaking_attention(q.unsqueeze(2), k, v)[0],
    "stick-breaking, recomputed": lambda q, k, v: stick_breaking_attention(
        q.unsqueeze(2), k, v, recompute_weights=True
    )[0],
    "naive stick-breaking": naive_stick_breaking,
}
TRITON_FORMS = {  # on CUDA the stick-breaking forms above run the fused Triton kernel: these run the blocked one
    "stick-breaking, PyTorch": without_triton(IMPLEMENTATIONS["stick-breaking"]),
    "stick-breaking, PyTorch, recomputed": without_triton(IMPLEMENTATIONS["stick-breaking, recomputed"]),
}


def make_step(name, q, k, v, backward):
    attention = {**IMPLEMENTATIONS, **TRITON_FORMS}[name]

    def step():
        if not backward:
            with torch.no_grad():
                attention(q, k, v)
            return
        for x in (q, k, v):
            x.grad = None
        out = attention(q, k, v)
        out.backward(torch.ones_like(out))

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(step) -> float | None:
    """Growth of the peak resident set during one `step()`, in MiB (None where /proc is not Linux's); on an
    accelerator, the growth of the peak of memory allocated on it."""
    if torch.get_default_device().type != "cpu":
        gc.collect()
        torch.accelerator.synchronize()
        torch.accelerator.reset_peak_memory_stats()
        before = torch.accelerator.memory_allocated()
        step()
        torch.accelerator.synchronize()
        return (torch.accelerator.max_memory_allocated() - before) / 2**20
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _status_kib("VmRSS")
        step()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--naive-max-seq", type=int, default=512, help="run the naive formula up to this length")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny shapes, one repeat")
    args = parser.parse_args()
    if args.tiny:
        args.seqs, args.batch, args.heads, args.head_dim, args.repeats, args.warmup = [32, 64], 1, 2, 16, 1, 0
    for name in ("batch", "heads", "head_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    if min(args.seqs) < 1:
        parser.error(f"--seqs {args.seqs}: lengths must be >= 1.")
    setup(args.threads, args.seed, args.malloc, args.device)
    dtype = DTYPES[args.dtype]

    results = []
    for seq in args.seqs:
        shape = (args.batch, args.heads, seq, args.head_dim)
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        names = [n for n in IMPLEMENTATIONS if n != "naive stick-breaking" or seq <= args.naive_max_seq]
        if q.is_cuda and is_triton_available():
            names += list(TRITON_FORMS)
        for backward in (False, True):
            # without gradients, nothing is kept or recomputed: the two stick-breaking forms are one
            forms = [name for name in names if backward or "recomputed" not in name]
            steps = {name: make_step(name, q, k, v, backward) for name in forms}
            timings = time_interleaved(steps, warmup=args.warmup, repeats=args.repeats)
            for name, timing in timings.items():
                results.append({"seq": seq, "pass": "fwd+bwd" if backward else "fwd", "impl": name, "timing": timing,
                                "ratio": timing.median_s / timings["sdpa"].median_s})  # fmt: skip
    if not args.no_memory:  # after the timings: the allocator setting below slows large allocations down
        for r in results:
            shape = (args.batch, args.heads, r["seq"], args.head_dim)
            q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
            r["peak_mib"] = peak_memory_mib(make_step(r["impl"], q, k, v, r["pass"] == "fwd+bwd"))

    rows = [
        [r["seq"], r["pass"], r["impl"], fmt_ms(r["timing"]), f"{r['ratio']:.2f}x", fmt_load(r["timing"]),
         "n/a" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"]  # fmt: skip
        for r in results
    ]
    input_mib = 3 * args.batch * args.heads * 1024 * args.head_dim * dtype.itemsize / 2**20
    notes = [
        f"B={args.batch}, H={args.heads}, D={args.head_dim}, inputs {args.dtype} (stick-breaking computes in fp32), "
        f"causal, {args.device}, {args.threads} threads. Forward runs without autograd; fwd+bwd backpropagates a ones "
        f"gradient. "
        f"Peak memory: growth of the resident set (on an accelerator: of its allocated memory) during one call, "
        f"beyond the inputs (q, k, v = "
        f"{input_mib:.3f} MiB per 1k tokens); fwd+bwd includes the three input gradients."
    ]
    header = ["T", "pass", "implementation", "median (min) ms", "time / SDPA", "foreign load", "peak MiB"]
    payload = {
        "args": vars(args),
        "results": [{**{k: v for k, v in r.items() if k != "timing"}, "timing": timing_dict(r["timing"])}
                    for r in results],  # fmt: skip
    }
    write_report(f"Stick-breaking attention vs SDPA ({args.dtype})", header, rows, payload, args, notes)


if __name__ == "__main__":
    main()
