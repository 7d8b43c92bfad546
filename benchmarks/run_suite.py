"""The benchmark suite in one command: every section's script, fp32 and bf16, collected into one report.

    python -m benchmarks.run_suite --json benchmarks/results/suite.json --markdown benchmarks/results/suite.md
    python -m benchmarks.run_suite --out /tmp/suite --tiny --sections models     # smoke test (a minute)

Each section runs as its own process (a fresh allocator and no state carried between measurements) and writes its
Markdown and JSON into `--out`; the suite joins them into `--markdown` and `--json` (default `--out/SUITE.md` and
`--out/suite.json`), with the command that made them. bf16 runs only where the CPU has native bf16 instructions
(elsewhere torch emulates them, many times slower), unless `--dtypes` says otherwise. On a GPU, bf16 only by default,
at shapes that keep the card busy (`ACCELERATOR_SECTIONS`: 16 x 1024-token training batches, 16384 tokens per
dispatch), and `--peak-tflops` (the card's dense bf16 peak) adds the training steps' model FLOP utilisation:

    python -m benchmarks.run_suite --device cuda --peak-tflops 989 --out benchmarks/results/suite-h200

Sections (`--sections` runs some, e.g. one per locked run):
- `models`: every architecture against its dense baseline (`bench_models`): training, prefill and decoding speed,
  activation memory, FLOPs and KV-cache bytes per token;
- `dispatch`: the expert dispatch against the dense matmul and transformers' kernels, and the number of experts at
  fixed active compute (`bench_dispatch`);
- `attention`: stick-breaking attention against `scaled_dot_product_attention` from 256 to 2048 tokens
  (`bench_attention`), time and peak memory;
- `scaling`: every architecture's and baseline's training time per token at 256, 1024 and 2048 tokens
  (`bench_models --scaling`).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import checked_device

SECTIONS = {  # name -> [(module, extra arguments), ...]
    "models": [("bench_models", ["--dtype", "fp32"]), ("bench_models", ["--dtype", "bf16", "--pairs", "moeut",
                                                                         "moduleformer"])],
    "dispatch": [("bench_dispatch", ["--dtype", "fp32"]), ("bench_dispatch", ["--dtype", "bf16"])],
    "attention": [("bench_attention", [])],
    "scaling": [("bench_models", ["--dtype", "fp32", "--scaling", "--scaling-seqs", "256", "1024", "2048",
                                  "--scaling-tokens", "512", "--repeats", "2"])],
}  # fmt: skip
ACCELERATOR_SECTIONS = {  # run once per dtype; shapes large enough to keep a GPU busy, which the CPU's would not
    "models": [("bench_models", ["--batch", "16", "--seq", "1024", "--repeats", "10"])],
    "dispatch": [("bench_dispatch", ["--tokens", "16384", "--repeats", "10"])],
    "attention": [("bench_attention", ["--batch", "8", "--repeats", "10"])],
    "scaling": [("bench_models", ["--scaling", "--scaling-seqs", "256", "1024", "2048", "--scaling-tokens", "16384",
                                  "--repeats", "5"])],
}  # fmt: skip
TINY = {"bench_models": ["--tiny", "--repeats", "1"], "bench_dispatch": ["--tiny", "--repeats", "1"],
        "bench_attention": ["--tiny", "--repeats", "1"]}  # fmt: skip


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it torch emulates bf16 matmuls, many
    times slower than fp32, and the bf16 sections would take most of an hour while measuring the emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: let the user decide with --dtypes
    return "avx512_bf16" in flags or "amx_bf16" in flags


def section_runs(section: str, dtypes: list[str], device: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) of each run of `section`: on the CPU those of `SECTIONS` in the chosen dtypes; on an
    accelerator each of `ACCELERATOR_SECTIONS` once per dtype."""
    if device == "cpu":
        return [(module, extra) for module, extra in SECTIONS[section]
                if "--dtype" not in extra or extra[extra.index("--dtype") + 1] in dtypes]  # fmt: skip
    return [(module, [*extra, "--dtype", dtype]) for module, extra in ACCELERATOR_SECTIONS[section] for dtype in dtypes]


def run_section(module: str, extra: list[str], out: Path, index: int, args) -> dict:
    stem = f"{index:02d}-{module}"
    extra = [*extra, *TINY[module]] if args.tiny else extra
    extra = [*extra, "--device", args.device] if args.device != "cpu" else extra
    if args.peak_tflops and module == "bench_models" and "--scaling" not in extra:
        extra = [*extra, "--peak-tflops", str(args.peak_tflops)]
    command = [sys.executable, "-m", f"benchmarks.{module}", *extra, "--json", str(out / f"{stem}.json"),
               "--markdown", str(out / f"{stem}.md")]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    returncode = subprocess.run(command, check=False, stdout=subprocess.DEVNULL).returncode
    if returncode != 0:  # one broken section must not cost the others' results
        print(f"  {module} failed (exit status {returncode}): its report is left out", flush=True)
    return {"module": module, "arguments": extra, "seconds": time.perf_counter() - start, "stem": stem,
            "returncode": returncode}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/suite", help="folder for each section's reports")
    parser.add_argument("--json", help="the joined JSON report (default: --out/suite.json)")
    parser.add_argument("--markdown", help="the joined Markdown report (default: --out/SUITE.md)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"],
                        help="default: on the CPU fp32, and bf16 where it has native bf16 instructions; on an "
                             "accelerator bf16")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu (default), or an accelerator such as cuda")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s in bf16 (see bench_models)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a smoke test")
    args = parser.parse_args(argv)
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops={args.peak_tflops}: must be a positive number of TFLOP/s.")
    try:  # here, not in every section's process: a device that is not there would fail them all
        checked_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cpu":
        dtypes = args.dtypes or (["fp32", "bf16"] if native_bf16() else ["fp32"])
    else:
        dtypes = args.dtypes or ["bf16"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, runs = time.perf_counter(), []
    for section in args.sections:
        for module, extra in section_runs(section, dtypes, args.device):
            runs.append({"section": section, **run_section(module, extra, out, len(runs), args)})
    total = time.perf_counter() - started
    command = "python -m benchmarks.run_suite " + " ".join(sys.argv[1:] if argv is None else argv)
    parts = [f"# Benchmark suite\n\nCommand: `{command.strip()}` ({total / 60:.1f} minutes; {', '.join(dtypes)})\n"]
    if "bf16" not in dtypes and not args.dtypes and args.device == "cpu":
        parts.append("bf16 left out: this CPU has no native bf16 instructions (AVX512-BF16 or AMX).\n")
    for run in runs:
        parts.append(f"<!-- section {run['section']}: {run['seconds']:.0f} s -->\n")
        if run["returncode"] != 0:
            parts.append(
                f"**{run['module']} {' '.join(run['arguments'])} failed (exit status {run['returncode']}).**\n"
            )
        else:
            parts.append((out / f"{run['stem']}.md").read_text())
    markdown, json_path = Path(args.markdown or out / "SUITE.md"), Path(args.json or out / "suite.json")
    markdown.write_text("\n".join(parts))
    results = [None if run["returncode"] else json.loads((out / f"{run['stem']}.json").read_text()) for run in runs]
    payload = {"command": command, "seconds": total, "dtypes": dtypes,
               "runs": [{**run, "result": result} for run, result in zip(runs, results)]}  # fmt: skip
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"suite finished in {total / 60:.1f} minutes: {markdown}, {json_path}")


if __name__ == "__main__":
    main()
