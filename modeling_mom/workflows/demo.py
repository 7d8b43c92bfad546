"""`mom demo`: the main job on small embedded defaults, from a GPT-2 to evaluated, saved modular models.

    mom demo                          # a few minutes on 2 CPU cores, offline
    mom demo --gpt2 openai-community/gpt2 --hub-data --block-size 512 --pretrain-steps 2000 ...   # the real thing

1. A small GPT-2 (word-level tokenizer, 12 layers like GPT-2 small but narrow) is trained briefly on the embedded
   corpus (`embedded_data.py`), so that seeding from it means something. `--gpt2` uses a real one instead.
2. Every architecture with a converter (`conversion/gpt2_to_<arch>.py`) is seeded from it; where the converter
   offers a function-preserving form, that form's logits are compared with GPT-2's.
3. Each seeded model, and GPT-2 itself as the baseline, gets the same continued pretraining (`mom pretrain`),
   then fine-tuning and evaluation on an embedded GLUE SST-2-format task (`mom glue`) and an embedded XSUM-format
   summarization task (`mom summarize`, beam search, ROUGE).
4. Routing pictures (`mom inspect`), a generated sample, and active parameters per token are recorded; every
   checkpoint is loaded again with `trust_remote_code=True` in a fresh process without this package.
5. One comparison table is printed and written, with everything else, to OUT/results.json.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from . import embedded_data, glue, pretrain, summarize
from .common import WorkflowError, check_can_be_directory, check_positive, load_model_config, load_tokenizer
from .convert import converters, gpt2_tokenizer, offers_exact
from .convert import main as convert_main
from .routing import active_parameters, inspect_model, route_text

# Demo sizes, so that the whole demo runs in minutes on a CPU; architectures not listed use their converter's
# defaults. Override with --convert-options ARCH="--flag value ...".
DEMO_CONVERT_OPTIONS = {"moduleformer": "--num-experts 8 --num-attention-experts 4"}
DEMO_GPT2 = {"n_layer": 12, "n_embd": 64, "n_head": 4, "n_positions": 128}
PROBE = "the cat sees the river near the lake . the dog"
SET_BY_DEMO = ("--gpt2", "--out", "--overwrite", "-h", "--help")  # converter options --convert-options cannot set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--gpt2", help="GPT-2 checkpoint or Hub id to seed from (default: train a small one)")
    parser.add_argument("--archs", help=f"comma-separated subset of: {', '.join(converters())}")
    parser.add_argument("--convert-options", action="append", default=[], metavar='ARCH="OPTIONS"',
                        help="converter command-line options for one architecture (repeatable)")
    parser.add_argument("--hub-data", action="store_true",
                        help="use the Hub data sets (OpenWebText, GLUE, XSUM) instead of the embedded ones")
    parser.add_argument("--glue-task", default="sst2", help="GLUE task with --hub-data (embedded data: SST-2)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--gpt2-steps", type=int, default=300, help="training steps of the small GPT-2")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--glue-steps", type=int, default=250)
    parser.add_argument("--summarize-steps", type=int, default=150)
    parser.add_argument("--eval-summaries", type=int, default=32, help="validation documents to summarize")
    parser.add_argument("--skip-remote-check", action="store_true", help="no trust_remote_code reload check")


def command_args(module, argv: list[str]) -> argparse.Namespace:
    """A training command's options, with --overwrite: a demo run into an earlier one's --out replaces its runs (as
    `seed` replaces its conversions)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args([str(a) for a in [*argv, "--overwrite"]])


def write_embedded_data(folder: Path) -> dict[str, str]:
    """The embedded data sets as JSON-lines files, the way a user would pass their own."""
    ed = embedded_data
    return {
        "corpus": ed.write_jsonl([{"text": t} for t in ed.corpus(2000, seed=0)], folder / "corpus.jsonl"),
        "corpus_eval": ed.write_jsonl([{"text": t} for t in ed.corpus(100, seed=1)], folder / "corpus_eval.jsonl"),
        "sst2_train": ed.write_jsonl(ed.sentiment_task(1600, seed=2), folder / "sst2_train.jsonl"),
        "sst2_eval": ed.write_jsonl(ed.sentiment_task(300, seed=3), folder / "sst2_eval.jsonl"),
        "sum_train": ed.write_jsonl(ed.summarization_task(1600, seed=4), folder / "summaries_train.jsonl"),
        "sum_eval": ed.write_jsonl(ed.summarization_task(200, seed=5), folder / "summaries_eval.jsonl"),
    }


def small_gpt2_config(tokenizer) -> GPT2Config:
    return GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **DEMO_GPT2)


def train_small_gpt2(out: Path, data: dict, args) -> str:
    """A randomly initialised small GPT-2 with the embedded tokenizer, trained with `mom pretrain`."""
    tokenizer = embedded_data.build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(small_gpt2_config(tokenizer))
    model.save_pretrained(out / "init")
    tokenizer.save_pretrained(out / "init")
    record = pretrain.run(command_args(pretrain, [
        "--model", out / "init", "--out", out, "--dataset", data["corpus"], "--validation-file", data["corpus_eval"],
        "--block-size", args.block_size, "--max-steps", args.gpt2_steps, "--learning-rate", 3e-3,
        "--warmup-steps", args.gpt2_steps // 10, "--batch-size", 16, "--logging-steps", max(1, args.gpt2_steps // 4),
        "--save-steps", args.gpt2_steps,
    ]))
    return record["checkpoint"]


def exact_logit_difference(converter, gpt2_dir: str, tokenizer) -> float:
    """max |logits(converted with exact=True) - logits(GPT-2)| on a probe text (fp32, eval mode)."""
    gpt2 = GPT2LMHeadModel.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    exact = converter.convert(gpt2, exact=True).eval()
    input_ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return (exact(input_ids).logits - gpt2(input_ids).logits).abs().max().item()


def seed(arch: str, gpt2_dir: str, out: Path, options: str) -> str:
    """`mom convert ARCH --gpt2 GPT2 --out OUT/seeded --overwrite OPTIONS` (replacing an earlier demo's output)."""
    target = out / "seeded"
    convert_main([arch, "--gpt2", gpt2_dir, "--out", str(target), "--overwrite", *options.split()])
    return str(target)


def train_and_evaluate(name: str, model_dir: str, out: Path, data: dict, args) -> dict:
    """Continued pretraining, then GLUE and summarization fine-tuning from the pretrained checkpoint."""
    start = time.perf_counter()
    hub = args.hub_data
    lm = pretrain.run(command_args(pretrain, [
        "--model", model_dir, "--out", out / "pretrain", "--block-size", args.block_size,
        "--max-steps", args.pretrain_steps, "--warmup-steps", args.pretrain_steps // 10, "--batch-size", 16,
        "--logging-steps", max(1, args.pretrain_steps // 4), "--save-steps", args.pretrain_steps,
        *(["--eval-blocks", 64] if hub else ["--dataset", data["corpus"], "--validation-file", data["corpus_eval"]]),
    ]))
    classifier = glue.run(command_args(glue, [
        "--model", lm["checkpoint"], "--task", args.glue_task if hub else "sst2", "--out", out / "glue",
        "--max-steps", args.glue_steps, "--learning-rate", 1e-3, "--warmup-steps", args.glue_steps // 10,
        "--batch-size", 16, "--logging-steps", max(1, args.glue_steps // 4), "--save-steps", args.glue_steps,
        "--max-length", args.block_size,
        *(["--max-eval-samples", 1000] if hub else ["--train-file", data["sst2_train"],
                                                     "--validation-file", data["sst2_eval"]]),
    ]))
    summaries = summarize.run(command_args(summarize, [
        "--model", lm["checkpoint"], "--out", out / "summarize", "--max-steps", args.summarize_steps,
        "--learning-rate", 1e-3, "--warmup-steps", args.summarize_steps // 10, "--batch-size", 16,
        "--logging-steps", max(1, args.summarize_steps // 4), "--save-steps", args.summarize_steps,
        "--max-eval-samples", args.eval_summaries, "--max-new-tokens", 16, "--eval-batch-size", 8,
        *([] if hub else ["--train-file", data["sum_train"], "--validation-file", data["sum_eval"]]),
    ]))
    glue_scores = next(iter(classifier["results"].values()))
    return {
        "model": name,
        "lm_checkpoint": lm["checkpoint"],
        "glue_checkpoint": classifier["checkpoint"],
        "summarize_checkpoint": summaries["checkpoint"],
        "loss_seeded": lm["results"].get("eval_loss_before"),
        "loss": lm["results"].get("eval_loss"),
        "aux_loss": lm["results"].get("train_aux_loss"),
        "glue_task": classifier["task_title"],
        "glue": glue_scores,
        "rouge": {k: summaries["results"][k] for k in summarize.ROUGE_TYPES},
        "summary_sample": summaries["samples"][0],
        "train_seconds": time.perf_counter() - start,
    }


def describe_model(row: dict, tokenizer, out: Path, routed: bool) -> None:
    """Parameters, active parameters, a generated sample and (for models whose routers run) the routing pictures."""
    model = AutoModelForCausalLM.from_pretrained(row["lm_checkpoint"], dtype=torch.float32).eval()
    probe = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    row["params"] = model.num_parameters()
    row["active_params"] = active_parameters(model, probe)
    with torch.no_grad():
        sample = model.generate(probe, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    row["sample"] = tokenizer.decode(sample[0], skip_special_tokens=True)
    if routed and route_text(model, tokenizer, PROBE)[1]:  # a MoM with fixed routing or single-choice pools has none
        texts = embedded_data.corpus(50, seed=6)
        row["routing"] = {k: v for k, v in inspect_model(model, tokenizer, str(out / "routing.png"), text=PROBE,
                                                             texts=texts).items() if k != "markdown"}


REMOTE_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_mom"] = None  # a user without this package
    import torch
    import transformers
    checks = json.load(open(sys.argv[1]))
    for check in checks:
        auto = getattr(transformers, check["auto_class"])
        model = auto.from_pretrained(check["path"], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(torch.tensor([check["input_ids"]])).logits
        check["difference"] = (logits - torch.tensor(check["logits"])).abs().max().item()
        del check["logits"]
    print(json.dumps(checks))
    """
)


def remote_code_differences(rows: list[dict], tokenizer) -> None:
    """Load every saved checkpoint with trust_remote_code in one fresh process in which `modeling_mom` cannot be
    imported, and record the largest logit difference from the package's model (expected: 0)."""
    input_ids = tokenizer(PROBE)["input_ids"]
    checks = []
    for row in rows:
        for key, auto_class in (("lm_checkpoint", "AutoModelForCausalLM"),
                                ("glue_checkpoint", "AutoModelForSequenceClassification"),
                                ("summarize_checkpoint", "AutoModelForCausalLM")):
            auto = getattr(transformers, auto_class)
            model = auto.from_pretrained(row[key], dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(torch.tensor([input_ids])).logits
            checks.append({"row": row["model"], "path": os.path.abspath(row[key]), "auto_class": auto_class,
                           "input_ids": input_ids, "logits": logits.tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "checks.json"
        spec.write_text(json.dumps(checks))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(tmp) / "modules")}
        env.pop("PYTHONPATH", None)
        result = subprocess.run([sys.executable, "-c", REMOTE_CHECK, str(spec)], env=env, cwd=tmp,
                                capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"loading with trust_remote_code failed:\n{result.stderr[-3000:]}")
    for check in json.loads(result.stdout.strip().splitlines()[-1]):
        row = next(r for r in rows if r["model"] == check["row"])
        row["remote_difference"] = max(row.get("remote_difference", 0.0), check["difference"])


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def table(rows: list[dict]) -> str:
    """The comparison table (markdown)."""
    glue_title = rows[0]["glue_task"]
    metric = next(iter(rows[0]["glue"]))
    header = ["model", "params", "active/token", "LM loss seeded", "LM loss trained", "aux loss",
              f"{glue_title} {metric}", "ROUGE-1", "ROUGE-2", "ROUGE-L", "train+eval s", "exact Δ vs GPT-2",
              "remote-code Δ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], fmt(row.get("params")), fmt(int(row["active_params"]) if "active_params" in row
                                                           else None),
                 fmt(row["loss_seeded"]), fmt(row["loss"]), fmt(row["aux_loss"]), fmt(row["glue"][metric]),
                 *(fmt(row["rouge"][k]) for k in summarize.ROUGE_TYPES), f"{row['train_seconds']:.0f}",
                 fmt(row.get("exact_difference")), fmt(row.get("remote_difference"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_convert_options(values: list[str], archs: list[str]) -> dict[str, str]:
    options = dict(DEMO_CONVERT_OPTIONS)
    for value in values:
        arch, sep, flags = value.partition("=")
        if not sep or arch not in archs:
            raise WorkflowError(f"--convert-options {value!r}: expected ARCH=\"OPTIONS\" with ARCH in {archs}.")
        options[arch] = flags
    return options


def check_gpt2(source: str) -> None:
    """--gpt2 must be a GPT-2 checkpoint (a directory or a Hub id) saved with its tokenizer."""
    config = load_model_config(source, "--gpt2")
    if not isinstance(config, GPT2Config):
        raise WorkflowError(f"--gpt2 {source} is a {config.model_type!r} model; expected a GPT-2 ('gpt2').")
    if gpt2_tokenizer(source) is None:
        raise WorkflowError(f"--gpt2 {source} has no tokenizer; save one with the model.")


class ConversionChecked(Exception):
    """Stops a trial conversion once its checkpoint is complete, before it is renamed into place."""


def check_conversion(arch: str, converter, flags: str, gpt2: str, out: Path) -> None:
    """Run the converter's command line with `flags` on `gpt2`, into `out`, stopped before the rename (nothing stays
    there): an option it does not take, or a structure that does not fit the GPT-2, is refused now, naming
    --convert-options, not after the small GPT-2 is trained."""
    given = f"--convert-options {arch}={flags!r}"
    for name in (flag.partition("=")[0] for flag in flags.split()):
        if name in SET_BY_DEMO:
            raise WorkflowError(f"{given}: the demo sets {name} itself; allowed: the converter's other options.")

    def stop(checkpoint: Path) -> None:
        raise ConversionChecked

    with contextlib.redirect_stderr(io.StringIO()) as errors:
        try:
            converter.main(["--gpt2", gpt2, "--out", str(out), *flags.split()], add_files=stop)
        except ConversionChecked:
            return
        except SystemExit:  # the converter's usage error: "usage: ...", then "PROG: error: MESSAGE"
            message = " ".join(errors.getvalue().partition(": error: ")[2].split())
            raise WorkflowError(f"{given}: {message}") from None


def check_conversions(available: dict, archs: list[str], options: dict[str, str], gpt2: str | None) -> None:
    """Every architecture's conversion tried on --gpt2 (or a random GPT-2 of the small one's shape, which is trained
    later) in a temporary directory; with a large --gpt2 this costs one more conversion per architecture."""
    with tempfile.TemporaryDirectory() as tmp:
        if gpt2 is None:
            gpt2 = str(Path(tmp) / "gpt2")
            GPT2LMHeadModel(small_gpt2_config(embedded_data.build_tokenizer())).save_pretrained(gpt2)
        for arch in archs:
            check_conversion(arch, available[arch], options.get(arch, ""), gpt2, Path(tmp) / arch)


def check_arguments(args, available: dict) -> tuple[list[str], dict[str, str]]:
    """Every option checked before anything is written; returns the architectures and their converter options."""
    steps = ("gpt2_steps", "pretrain_steps", "glue_steps", "summarize_steps")
    check_positive(args, "block_size", "eval_summaries", *steps)
    check_can_be_directory(args.out, f"--out {args.out}")
    archs = args.archs.split(",") if args.archs else list(available)
    unknown = [a for a in archs if a not in available]
    if unknown:
        raise WorkflowError(f"--archs {unknown}: no converter; allowed: {', '.join(available)}.")
    options = parse_convert_options(args.convert_options, archs)
    task = glue.glue_task(args.glue_task, "--glue-task")
    if task.name != "sst2" and not args.hub_data:
        raise WorkflowError(f"--glue-task {args.glue_task!r} needs --hub-data; the embedded data is SST-2 only.")
    if args.gpt2:
        check_gpt2(args.gpt2)
    check_conversions(available, archs, options, args.gpt2)
    return archs, options


def quiet_libraries() -> None:
    """Only the Trainer's progress bars and logs: no weight-loading bars, data set bars or load-time notices."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run(args) -> list[dict]:
    available = converters()
    quiet_libraries()
    archs, options = check_arguments(args, available)
    started = time.perf_counter()
    out = Path(args.out)
    data = {} if args.hub_data else write_embedded_data(out / "data")

    print(f"== [1/5] GPT-2: {'using ' + args.gpt2 if args.gpt2 else 'training a small one on the embedded corpus'}")
    if args.gpt2:
        gpt2_dir = args.gpt2
        tokenizer = gpt2_tokenizer(gpt2_dir)
        local = out / "gpt2" / "source"
        GPT2LMHeadModel.from_pretrained(gpt2_dir).save_pretrained(local)
        tokenizer.save_pretrained(local)
        gpt2_dir = str(local)
    else:
        gpt2_dir = train_small_gpt2(out / "gpt2", data, args)
    tokenizer = load_tokenizer(gpt2_dir, needs_padding=True)

    rows = []
    for arch in archs:
        converter = available[arch]
        print(f"== [2/5] {arch}: seeding from GPT-2")
        exact = exact_logit_difference(converter, gpt2_dir, tokenizer) if offers_exact(converter) else None
        seeded = seed(arch, gpt2_dir, out / arch, options.get(arch, ""))
        print(f"== [3/5] {arch}: continued pretraining, GLUE and summarization")
        row = train_and_evaluate(arch, seeded, out / arch, data, args)
        row["exact_difference"] = exact
        print(f"== [4/5] {arch}: routing pictures, sample, active parameters")
        describe_model(row, tokenizer, out / arch, routed=True)
        rows.append(row)
    print("== [3/5] gpt2 (baseline): the same continued pretraining, GLUE and summarization")
    baseline = train_and_evaluate("gpt2", gpt2_dir, out / "gpt2-baseline", data, args)
    describe_model(baseline, tokenizer, out / "gpt2-baseline", routed=False)
    rows.insert(0, baseline)

    if not args.skip_remote_check:
        print("== [5/5] loading every checkpoint with trust_remote_code=True in a fresh process")
        remote_code_differences(rows[1:], tokenizer)
    summary = table(rows)
    elapsed = time.perf_counter() - started
    print(f"\n{summary}\n")
    for row in rows:
        print(f"{row['model']:>13} sample: {row['sample']!r}")
        print(f"{'':>13} summary: {row['summary_sample']['generated']!r} "
              f"(reference {row['summary_sample']['reference']!r})")
        if "routing" in row:
            print(f"{'':>13} routing: {row['routing']['heatmap']}, {row['routing']['usage']}")
        print(f"{'':>13} checkpoints: {row['lm_checkpoint']}, {row['glue_checkpoint']}, {row['summarize_checkpoint']}")
    print(f"\nfinished in {elapsed:.0f} s; results in {out / 'results.json'}")
    (out / "results.json").write_text(json.dumps({"table": summary, "seconds": elapsed, "rows": rows}, indent=2,
                                                 default=str) + "\n")
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="mom demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
