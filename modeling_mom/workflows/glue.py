"""`mom glue`: fine-tune and evaluate a sequence classifier on one of the nine GLUE tasks.

    mom glue --model runs/mom-owt/final --task sst2 --out runs/mom-sst2           # nyu-mll/glue from the Hub
    mom glue --model DIR --task rte --out OUT --train-file train.csv --validation-file dev.csv

Local files hold the Hub data set's columns (e.g. `sentence1`, `sentence2`, `label` for RTE). The model is
`AutoModelForSequenceClassification` (a decoder-only classifier pools the last real token); sentence pairs are
encoded as pairs, truncated longest first, with the tokenizer's separator token (SEP, else EOS) between them where
the tokenizer puts none. Each task is scored on its validation split(s) with
its official GLUE metric, computed by scikit-learn / SciPy: Matthews correlation (CoLA), Pearson and Spearman
correlation (STS-B), F1 and accuracy (MRPC, QQP), accuracy (the others; MNLI on matched and mismatched). The
results are written to OUT/results.json and into the checkpoint's history (hence its model card).
"""

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    set_seed,
)

from .common import (
    WorkflowError,
    check_columns,
    check_context_length,
    check_positive,
    is_classifier,
    load_local_split,
    load_model_config,
    load_tokenizer,
    model_context_length,
    text_cells,
)
from .training import (
    MoETrainer,
    add_training_arguments,
    check_training_arguments,
    finish,
    train,
    training_arguments,
)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its input columns, label count (1: regression) and metrics, and its evaluation splits."""

    name: str
    title: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)


GLUE_TASKS = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", ("sentence",), 2, ("matthews_correlation",)),
        GlueTask("sst2", "SST-2", ("sentence",), 2, ("accuracy",)),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("f1", "accuracy")),
        GlueTask("qqp", "QQP", ("question1", "question2"), 2, ("f1", "accuracy")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), 3, ("accuracy",),
                 ("validation_matched", "validation_mismatched")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), 2, ("accuracy",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), 2, ("accuracy",)),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), 2, ("accuracy",)),
    )
}


def glue_task(name: str, option: str = "--task") -> GlueTask:
    """The task called `name` ("SST-2", "sst2" and "sst_2" are the same task), given as `option`."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise WorkflowError(f"{option} {name!r} is not a GLUE task; allowed: {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


def glue_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official metrics of `predictions` (`[N, num_labels]` scores) against `labels`."""
    if task.num_labels == 1:
        scores = predictions.reshape(-1)
        return {"pearson": float(pearsonr(scores, labels)[0]), "spearmanr": float(spearmanr(scores, labels)[0])}
    predicted = predictions.argmax(-1)
    scorers = {"accuracy": accuracy_score, "f1": f1_score, "matthews_correlation": matthews_corrcoef}
    return {name: float(scorers[name](labels, predicted)) for name in task.metrics}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(GLUE_TASKS)}")
    parser.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: the model's)")
    parser.add_argument("--pad-token", help="use this vocabulary token for padding (e.g. GPT-2's <|endoftext|>)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-file", help=f"local training file (default: {HUB_DATASET} from the Hub)")
    data.add_argument("--validation-file", help="local validation file (MNLI: the matched one)")
    data.add_argument("--validation-mismatched-file", help="MNLI only: local mismatched validation file")
    data.add_argument(
        "--max-length", type=int, help="tokens per example, truncated beyond (default: min(128, model max))"
    )
    data.add_argument("--max-train-samples", type=int, help="train on the first N examples only")
    data.add_argument("--max-eval-samples", type=int, help="evaluate on the first N examples of each split only")
    add_training_arguments(parser, steps=-1, epochs=3, lr=2e-5, batch_size=32, warmup=0, weight_decay=0.0)


def local_files(task: GlueTask, args) -> dict[str, str]:
    """`{"train": path, <eval split>: path, ...}` of the local data files given (empty for the Hub's data set)."""
    files = {"train": args.train_file, task.eval_splits[0]: args.validation_file}
    if args.validation_mismatched_file:
        files[task.eval_splits[1]] = args.validation_mismatched_file
    return files if args.train_file else {}


def load_splits(task: GlueTask, args) -> dict:
    """`{"train": Dataset, <eval split>: Dataset, ...}` from local files or the Hub, checked for the task's columns."""
    columns = [*task.text_columns, "label"]
    if args.validation_mismatched_file and len(task.eval_splits) == 1:
        raise WorkflowError(f"--validation-mismatched-file is for MNLI only; {task.name!r} has one validation set.")
    if args.train_file or args.validation_file:
        if not (args.train_file and args.validation_file):
            raise WorkflowError("local GLUE data needs both --train-file and --validation-file.")
        splits = {split: load_local_split(path, columns) for split, path in local_files(task, args).items()}
    else:
        from datasets import load_dataset

        try:
            hub = load_dataset(HUB_DATASET, task.name)
        except Exception as error:  # datasets raises many types when the Hub is unreachable
            raise WorkflowError(f"cannot load {HUB_DATASET} {task.name} ({error}); pass local files.") from error
        splits = {split: hub[split] for split in ("train", *task.eval_splits)}
        for split, data in splits.items():
            check_columns(data, columns, f"{HUB_DATASET} {task.name} {split}")
    limits = {"train": args.max_train_samples}
    for split, data in splits.items():
        limit = limits.get(split, args.max_eval_samples)
        if limit is not None:
            splits[split] = data.select(range(min(limit, len(data))))
        check_labels(task, splits[split], split)
    return splits


def check_labels(task: GlueTask, data, split: str) -> None:
    try:
        labels = np.asarray(data["label"], dtype=float)
    except (TypeError, ValueError) as error:
        kind = "similarity scores" if task.num_labels == 1 else f"class indices 0..{task.num_labels - 1}"
        raise WorkflowError(f"{task.title} {split}: labels must be numbers ({kind}), as in {HUB_DATASET}; "
                            f"found {error}.") from error
    if task.num_labels == 1:
        if not np.isfinite(labels).all():
            raise WorkflowError(f"{task.title} {split}: labels must be finite similarity scores.")
        if split != "train" and len(labels) < 2:
            raise WorkflowError(f"{task.title} {split}: {len(labels)} example; its Pearson and Spearman correlations "
                                "need at least 2.")
        return
    allowed = set(range(task.num_labels))
    bad = sorted({float(x) for x in labels if x not in allowed})
    if bad:
        raise WorkflowError(
            f"{task.title} {split}: labels {bad[:5]} are not class indices; allowed: {sorted(allowed)}."
        )


def check_head(model: str, config, task: GlueTask) -> None:
    """A classifier checkpoint is fine-tuned further with its own head, which must have the task's outputs."""
    if is_classifier(config) and config.num_labels != task.num_labels:
        raise WorkflowError(
            f"--model {model} is a classifier with {config.num_labels} outputs; {task.title} needs "
            f"{task.num_labels}. Give the language model it was fine-tuned from (e.g. a pretrain or convert output)."
        )


def encode(task: GlueTask, tokenizer, max_length: int):
    """Batched map function: the example's text tokenised and truncated, plus label.

    A sentence pair is encoded as a pair, truncated longest first (as transformers' `run_glue`), so that a long first
    sentence cannot push the second out of the input. A tokenizer that does not separate pairs itself (GPT-2's
    concatenates them) gets its SEP or EOS token at the start of the second sentence.
    """
    pair = len(task.text_columns) == 2
    separator = ""
    if pair and tokenizer.num_special_tokens_to_add(pair=True) == tokenizer.num_special_tokens_to_add(pair=False):
        separator = tokenizer.sep_token or tokenizer.eos_token
        if separator is None:
            raise WorkflowError("the tokenizer has neither a SEP nor an EOS token to join sentence pairs with.")
        separator += " "

    def apply(batch):
        if pair:
            first, second = (text_cells(batch, c) for c in task.text_columns)
            second = [separator + text for text in second]
            encoded = tokenizer(first, second, truncation="longest_first", max_length=max_length)
        else:
            encoded = tokenizer(text_cells(batch, task.text_columns[0]), truncation=True, max_length=max_length)
        if any(len(ids) == 0 for ids in encoded["input_ids"]):
            columns = " / ".join(repr(c) for c in task.text_columns)
            raise WorkflowError(f"a row's text ({columns}) gives no tokens (an empty cell?); every row needs text.")
        # `check_labels` took the labels as numbers ("1.0" and 1.0 alike): read them the same way
        encoded["labels"] = [float(x) if task.num_labels == 1 else int(float(x)) for x in batch["label"]]
        return encoded

    return apply


def run(args) -> dict:
    task = glue_task(args.task)
    check_training_arguments(args)
    check_positive(args, "max_length", "max_train_samples", "max_eval_samples")
    config = load_model_config(args.model)
    check_head(args.model, config, task)
    args.max_length = args.max_length or min(128, model_context_length(config) or 128)
    check_context_length(args.max_length, config, "--max-length")
    tokenizer = load_tokenizer(args.model, args.tokenizer, needs_padding=True, pad_token=args.pad_token)
    if args.push_to_hub:
        from .hub import check_push_target

        check_push_target(args.push_to_hub, config, args.license)
    splits = load_splits(task, args)
    splits = {
        split: data.map(encode(task, tokenizer, args.max_length), batched=True, remove_columns=data.column_names)
        for split, data in splits.items()
    }

    set_seed(args.seed)  # new weights (a classifier head) start the same whatever ran before
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=task.num_labels, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = MoETrainer(
        model=model,
        args=training_arguments(args),
        train_dataset=splits["train"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=lambda p: glue_metrics(task, first(p.predictions), p.label_ids),
    )
    train(trainer, args)
    metrics = {}
    for split in task.eval_splits:
        if split in splits:
            scores = trainer.evaluate(splits[split], metric_key_prefix=split)
            metrics[split] = {name: scores[f"{split}_{name}"] for name in task.metrics}
    record = {
        "command": "glue",
        "task": task.name,
        "task_title": task.title,
        "dataset": HUB_DATASET if not args.train_file else args.train_file,
        "train_examples": len(splits["train"]),
        "validation_files": {split: path for split, path in local_files(task, args).items() if split != "train"},
        "eval_examples": {split: len(splits[split]) for split in metrics},
        "max_length": args.max_length,
        "learning_rate": args.learning_rate,
        "steps": trainer.state.global_step,
        "results": metrics,
    }
    return finish(trainer, args, record, {"results.json": record})


def first(predictions):
    """Model outputs beyond the logits (e.g. router logits) come as a tuple; the metric needs the logits."""
    return predictions[0] if isinstance(predictions, tuple) else predictions


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="mom glue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    record = run(parser.parse_args(argv))
    print(f"{record['task_title']}: {record['results']}; saved {record['checkpoint']}")
    return record
