"""The `mom` command: from a GPT-2 checkpoint to a published, evaluated modular model.

    mom demo                                   the whole path on small embedded data (minutes on a CPU)
    mom convert ARCH --gpt2 SRC --out DIR      seed an architecture from GPT-2
    mom pretrain --model DIR --out OUT         continued pretraining (OpenWebText by default)
    mom glue --model DIR --task TASK --out OUT fine-tune and evaluate on a GLUE task
    mom summarize --model DIR --out OUT        fine-tune and evaluate on XSUM (decoder-only, ROUGE)
    mom inspect --model DIR --text ... --out P routing heat map, usage map and tables
    mom push DIR REPO_ID [--license ID]        upload weights, code, tokenizer and model card to the Hub

`mom COMMAND --help` describes each. The training commands run under `accelerate launch` unchanged (DDP or FSDP,
several GPUs or nodes, as set by `accelerate config`): `accelerate launch -m modeling_mom.workflows.cli pretrain ...`;
`accelerate launch --multi_gpu --num_processes 2 -m modeling_mom.workflows.cli ...` starts 2 processes on any machine.
"""

import importlib
import importlib.util
import os
import sys

from .common import WorkflowError
from .cpu_memory import keep_freed_memory

COMMANDS = {
    "demo": "demo",
    "convert": "convert",
    "pretrain": "pretrain",
    "glue": "glue",
    "summarize": "summarize",
    "inspect": "routing",
    "push": "hub",
}

TRAIN_EXTRAS = {"datasets", "sklearn", "scipy", "rouge_score", "matplotlib"}  # setup.cfg's `train`


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"mom: unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}.", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for big CPU temporaries: fewer page faults
    keep_freed_memory()  # and no page faults at all for the ones a training step allocates again every step
    command, rest = argv[0], argv[1:]
    try:
        importlib.import_module(f"{__package__}.{COMMANDS[command]}").main(rest)
    except WorkflowError as error:
        print(f"mom {command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in TRAIN_EXTRAS or importlib.util.find_spec(missing) is not None:  # installed: a real bug
            raise
        print(f"mom {command}: error: it needs the package's `train` extra (module {missing!r} is missing): "
              "pip install 'modeling-mom[train]' (or `pip install -e \".[train]\"` in a checkout).", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
