"""Timing and reporting helpers shared by the benchmark scripts.

An entry point sets `THP_MEM_ALLOC_ENABLE=1` before it imports torch (PyTorch's CPU allocator then asks for
transparent huge pages; without it, large fresh tensors page-fault their way in at ~4x the cost of the copy on the
reference machine), then (`setup` also makes glibc keep freed memory for reuse unless `--malloc default`:
see `modeling_mom.workflows.cpu_memory`):

    args = build_parser("what it measures").parse_args()
    setup(args.threads, args.seed, args.malloc, args.device)
    timings = time_interleaved({"gpt2": step_a, "mom": step_b}, warmup=args.warmup, repeats=args.repeats)
    write_report(title, header, rows, payload, args)

Each figure is the median (and minimum) over repeats, with the "foreign load" beside it: the average number of
cores other processes used while it was being timed (busy jiffies of the whole machine from `/proc/stat`, minus
this process's own CPU time). Figures taken with a foreign load above `FOREIGN_LOAD_WARNING` are unreliable on a
2-core machine and are marked.

`--device cuda` (or another accelerator torch knows) makes it the default device: models, inputs and every tensor
the scripts create live there, and each timed call ends with a device synchronisation, so the time is the device's,
not the launch's. The foreign load still counts the host's CPUs only.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from modeling_mom.workflows.cpu_memory import keep_freed_memory

FOREIGN_LOAD_WARNING = 0.3
_ENVIRONMENT = {"malloc": "default", "device": "cpu"}  # what `setup` changed
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent not idle since boot (None where `/proc/stat` does not exist)."""
    try:
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle, iowait = jiffies[3], jiffies[4]
    return (sum(jiffies) - idle - iowait) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    """Seconds per call of one benchmarked function."""

    name: str
    median_s: float
    min_s: float
    repeats: int
    foreign_load: float | None  # average cores used by other processes while timing; None if unknown

    @property
    def disturbed(self) -> bool:
        return self.foreign_load is not None and self.foreign_load > FOREIGN_LOAD_WARNING


def synchronize() -> None:
    """Wait for the default device's queued work (nothing to wait for on the CPU)."""
    if torch.get_default_device().type != "cpu":
        torch.accelerator.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5) -> dict[str, Timing]:
    """Time each function `repeats` times, round-robin (a, b, a, b, ...) so slow drifts of the machine's load hit
    every function alike; `warmup` untimed rounds first. Returns a `Timing` per name."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1.")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    foreign = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            busy0, cpu0, t0 = _machine_busy_seconds(), time.process_time(), time.perf_counter()
            fn()
            synchronize()
            elapsed = time.perf_counter() - t0
            busy1, cpu1 = _machine_busy_seconds(), time.process_time()
            samples[name].append(elapsed)
            if busy0 is not None:
                foreign[name] += (busy1 - busy0) - (cpu1 - cpu0)
    timings = {}
    for name, times in samples.items():
        load = None if _machine_busy_seconds() is None else max(0.0, foreign[name] / sum(times))
        timings[name] = Timing(name, statistics.median(times), min(times), repeats, load)
    return timings


def build_parser(description: str, repeats: int = 5) -> argparse.ArgumentParser:
    """The flags every benchmark shares: threads, repeats, warm-up, dtype, output paths."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats per figure (default {repeats})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument(
        "--device", default="cpu", help="where models and inputs live: cpu (default), or an accelerator such as cuda"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--markdown", help="write the results as a Markdown table to this path")
    parser.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="keep: glibc keeps freed memory for reuse (the setting the `mom` command trains with; see "
        "modeling_mom.workflows.cpu_memory); default: glibc's defaults, which unmap every freed block over 32 MB",
    )
    return parser


def setup(threads: int, seed: int = 0, malloc: str = "keep", device: str = "cpu") -> None:
    """Fix the thread count (results depend on it), the random seed, how freed memory is handled and the device
    every model and tensor is created on."""
    if threads < 1:
        raise ValueError(f"--threads={threads} must be >= 1.")
    target = checked_device(device)
    if malloc == "keep":
        _ENVIRONMENT["malloc"] = "keep" if keep_freed_memory() else "default (not glibc)"
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if target.type != "cpu":  # the default device is a function mode: ~7 us more per operator, even for "cpu"
        torch.set_default_device(target)
    _ENVIRONMENT["device"] = torch.cuda.get_device_name(target) if target.type == "cuda" else str(target)


def checked_device(device: str) -> torch.device:
    """`device` as a torch device, refused by name where this torch cannot compute on it."""
    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device={device!r} is not a device name (cpu, cuda, cuda:1, ...): {error}") from None
    if target.type == "cpu":
        return target
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != target.type:
        found = "none" if accelerator is None else accelerator.type
        raise ValueError(f"--device={device!r}: this torch has no {target.type} device (accelerator found: {found}).")
    return target


def environment() -> dict:
    """What a reader needs to compare figures across runs."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        **_ENVIRONMENT,
        "python": platform.python_version(),
    }


def command_line() -> str:
    """The command that produced the results, runnable from the repository root."""
    module = sys.modules["__main__"].__spec__
    entry = f"-m {module.name}" if module is not None else shlex.quote(sys.argv[0])
    return f"python {entry} {shlex.join(sys.argv[1:])}".rstrip()


def fmt_ms(timing: Timing) -> str:
    """`median (min) ms`, with ⚠ when the machine was busy with other work."""
    mark = " ⚠" if timing.disturbed else ""
    return f"{timing.median_s * 1e3:.1f} ({timing.min_s * 1e3:.1f}){mark}"


def fmt_load(timing: Timing) -> str:
    return "n/a" if timing.foreign_load is None else f"{timing.foreign_load:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    title: str, header: list[str], rows: list[list[str]], payload: dict, args, notes: list[str] = (), timed=True
) -> str:
    """Print the Markdown report (title, command, environment, notes, table, and how times are summarised if
    `timed`) and write it and the JSON where asked."""
    env = environment()
    markdown = "\n".join(
        [
            f"## {title}",
            "",
            f"Command: `{command_line()}`",
            "",
            "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()),
            "",
            *(f"{note}\n" for note in notes),
            markdown_table(header, rows),
            "",
            *(
                [
                    f"Times are median (min) over the repeats; ⚠ marks a foreign load above {FOREIGN_LOAD_WARNING} "
                    "(other processes competed for the CPU: treat as unreliable).",
                    "",
                ]
                if timed
                else []
            ),
        ]
    )
    print(markdown)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown)
    if args.json:
        text = json.dumps({"title": title, "command": command_line(), "environment": env, **payload}, indent=2)
        with open(args.json, "w") as f:
            f.write(text)
    return markdown


def timing_dict(timing: Timing) -> dict:
    return {**asdict(timing), "disturbed": timing.disturbed}


def per_token(timing: Timing, tokens: int) -> Timing:
    """The same timing divided by the number of tokens a call processed."""
    return replace(timing, median_s=timing.median_s / tokens, min_s=timing.min_s / tokens)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def non_embedding_parameters(model) -> int:
    """Parameters outside the input and output embeddings (the part that matching a baseline is about)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    embeddings |= {id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def train_step(model, input_ids) -> Callable[[], None]:
    """One forward + backward of the causal-LM loss on `input_ids` (gradients reset first)."""
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    return step


def prefill(model, prompt) -> Callable[[], None]:
    """One cached forward of `prompt`, as generation's first step does."""
    model.eval()

    def step():
        with torch.no_grad():
            model(input_ids=prompt, use_cache=True)

    return step


def greedy_decode(model, prompt, new_tokens: int) -> Callable[[], None]:
    """Cached greedy generation of exactly `new_tokens` tokens after `prompt` (a shorter output is an error)."""
    model.eval()
    attention_mask = torch.ones_like(prompt)

    def decode():
        out = model.generate(prompt, attention_mask=attention_mask, do_sample=False, pad_token_id=0, use_cache=True,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # fmt: skip
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens instead of {new_tokens}")

    return decode


def without_triton(forward):
    """`forward` with modeling_mom's Triton kernels switched off (`MODELING_MOM_TRITON=0`; the choice is made in the
    forward pass, so its backward follows)."""

    def run(*args, **kwargs):
        previous = os.environ.get("MODELING_MOM_TRITON")
        os.environ["MODELING_MOM_TRITON"] = "0"
        try:
            return forward(*args, **kwargs)
        finally:
            if previous is None:
                del os.environ["MODELING_MOM_TRITON"]
            else:
                os.environ["MODELING_MOM_TRITON"] = previous

    return run
