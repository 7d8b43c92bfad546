"""How far a GPT-2-seeded model's loss is from GPT-2's, before and after a short continued pretraining.

    python -m benchmarks.upcycling --markdown benchmarks/results/upcycling.md --json upcycling.json
    python -m benchmarks.upcycling --gpt2 openai-community/gpt2 --dataset corpus.txt --validation-file held_out.txt \
        --block-size 512 --steps 2000                                      # with a real GPT-2, for users with one

The function-preserving ("exact") conversions must start at GPT-2's loss; upcycling ones (MoEUT with shared layers,
ModuleFormer with stick-breaking attention) do not, and continued pretraining has to close the gap. Every variant,
and GPT-2 itself as the control, gets the same continued pretraining (`mom pretrain`: same data, order, steps and
optimiser); the held-out loss is the language-modelling loss only (the Trainer's `eval_loss` of `mom pretrain`).

By default the GPT-2 is the `mom demo`'s small one (12 layers, width 64), trained on the embedded corpus and
evaluated on its held-out split: no network. The figures then show the size of the effect on a small model, not
what a GPT-2 small would give.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: set it first

import argparse
import json
import math
from pathlib import Path

from benchmarks.common import command_line, environment, markdown_table, setup
from modeling_mom.workflows import demo, pretrain

# name -> (architecture, converter options): the exact forms (gap ~ 0, a check), then the upcycling recipes
VARIANTS = {
    "moeut-exact": ("moeut", "--exact"),
    "moeut-G6": ("moeut", "--num-unique-layers 6"),
    "moeut-G2": ("moeut", "--num-unique-layers 2"),
    "moeut-G2-peri": ("moeut", "--num-unique-layers 2 --norm-scheme peri"),
    "moduleformer-exact": ("moduleformer", "--exact --num-experts 8 --num-attention-experts 4"),
    "moduleformer-stickbreaking": ("moduleformer", "--num-experts 8 --num-attention-experts 4"),
    "moduleformer-stickbreaking-sliced": ("moduleformer", "--num-experts 8 --num-attention-experts 4 --slice-mlp"),
}


def continued_pretraining(model_dir: str, out: Path, data: dict, args) -> dict:
    """`mom pretrain` on the data: returns the held-out LM loss before (`eval_loss_before`) and after training."""
    if args.gpt2 and args.dataset:
        data_flags = ["--dataset", args.dataset, *(["--validation-file", args.validation_file]
                                                   if args.validation_file else [])]
    else:
        data_flags = ["--dataset", data["corpus"], "--validation-file", data["corpus_eval"]]
    record = pretrain.run(demo.command_args(pretrain, [
        "--model", model_dir, "--out", out, "--block-size", args.block_size, "--max-steps", args.steps,
        "--warmup-steps", args.steps // 10, "--batch-size", args.batch_size, "--learning-rate", args.learning_rate,
        "--logging-steps", max(1, args.steps // 4), "--save-steps", args.steps, "--no-progress", *data_flags,
    ]))  # fmt: skip
    return record["results"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/upcycling", help="working directory (default runs/upcycling)")
    parser.add_argument("--gpt2", help="GPT-2 directory or Hub id (default: train the demo's small one)")
    parser.add_argument("--dataset", help="with --gpt2: training text (local file or Hub data set)")
    parser.add_argument("--validation-file", help="with --gpt2: held-out text")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=200, help="continued-pretraining steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--gpt2-steps", type=int, default=300, help="training steps of the small GPT-2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--markdown", help="write the results as a Markdown table to this path")
    args = parser.parse_args(argv)
    setup(args.threads)
    demo.quiet_libraries()
    out = Path(args.out)
    data = demo.write_embedded_data(out / "data")
    gpt2_dir = args.gpt2 or demo.train_small_gpt2(out / "gpt2", data, args)

    control = continued_pretraining(gpt2_dir, out / "gpt2-control", data, args)
    rows, results = [], {"gpt2": control}
    header = ["model", "converter options", "loss seeded", "gap seeded", "loss after", "gap after",
              "perplexity after / GPT-2's"]  # fmt: skip
    rows.append(["gpt2 (control)", "", f"{control['eval_loss_before']:.3f}", "0", f"{control['eval_loss']:.3f}",
                 "0", "1.00"])  # fmt: skip
    for name in args.variants:
        arch, options = VARIANTS[name]
        seeded = demo.seed(arch, gpt2_dir, out / name, options)
        result = continued_pretraining(seeded, out / name / "pretrain", data, args)
        results[name] = {"options": options, **result}
        gap_before = result["eval_loss_before"] - control["eval_loss_before"]
        gap_after = result["eval_loss"] - control["eval_loss"]
        rows.append([name, f"`{options}`", f"{result['eval_loss_before']:.3f}", f"{gap_before:+.3f}",
                     f"{result['eval_loss']:.3f}", f"{gap_after:+.3f}", f"{math.exp(gap_after):.2f}"])  # fmt: skip

    settings = (f"{args.steps} steps of {args.batch_size} x {args.block_size} tokens, AdamW lr {args.learning_rate} "
                f"(cosine, {args.steps // 10} warm-up steps)")  # fmt: skip
    markdown = "\n".join([
        "## GPT-2 -> MoEUT / ModuleFormer: loss gap before and after continued pretraining",
        "",
        f"Command: `{command_line()}`",
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in environment().items()),
        "",
        f"GPT-2: {args.gpt2 or 'the demo small GPT-2 (12 layers, width 64), trained on the embedded corpus'}; "
        f"continued pretraining: {settings}; held-out LM loss (nats/token). Gaps are against GPT-2 itself, seeded "
        "(its own loss) and after the same continued pretraining (the control).",
        "",
        markdown_table(header, rows),
        "",
    ])  # fmt: skip
    print(markdown)
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    if args.json:
        payload = {"command": command_line(), "environment": environment(), "settings": settings, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
