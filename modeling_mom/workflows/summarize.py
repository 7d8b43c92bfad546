"""`mom summarize`: abstractive summarization as a decoder-only task, evaluated with beam search and ROUGE.

    mom summarize --model runs/mom-owt/final --out runs/mom-xsum                  # EdinburghNLP/xsum from the Hub
    mom summarize --model DIR --out OUT --train-file train.jsonl --validation-file dev.jsonl

The recipe (ours; the MoM paper does not describe its XSUM protocol): each example is
`document + " TL;DR: " + summary + EOS` (the separator is the GPT-2 paper's summarization cue; `--separator`
changes it); the loss is on the summary tokens only; documents are truncated so that the example fits
`--max-length` tokens. Evaluation prompts with `document + " TL;DR:"` (documents truncated to leave room for
`--max-new-tokens`), decodes with beam search, and scores ROUGE-1/2/L F1 with stemming (`rouge-score`, the
package behind `evaluate`'s ROUGE), averaged over examples. The prompt format and decoding settings are written
into OUT/results.json (with a few sample summaries; all of them in OUT/predictions.json) and the model card.
"""

import argparse
import math

import torch
from accelerate.utils import gather_object
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, set_seed

from .common import (
    WorkflowError,
    check_columns,
    check_context_length,
    check_language_model,
    check_positive,
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

DEFAULT_DATASET = "EdinburghNLP/xsum"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id of a causal LM")
    parser.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: the model's)")
    parser.add_argument("--pad-token", help="use this vocabulary token for padding (e.g. GPT-2's <|endoftext|>)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=DEFAULT_DATASET, help=f"Hub data set (default {DEFAULT_DATASET})")
    data.add_argument("--train-file", help="local training file (instead of --dataset)")
    data.add_argument("--validation-file", help="local validation file (instead of --dataset)")
    data.add_argument("--document-column", default="document")
    data.add_argument("--summary-column", default="summary")
    data.add_argument("--separator", default="TL;DR:", help="text between document and summary")
    data.add_argument("--max-length", type=int, help="tokens per example (default: min(1024, model max))")
    data.add_argument(
        "--max-summary-tokens", type=int, help="reference summaries cut to this (default: min(64, max-length / 2))"
    )
    data.add_argument("--max-train-samples", type=int)
    data.add_argument("--max-eval-samples", type=int, default=500,
                      help="score the first N validation examples (a number above the split's size scores all)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--num-beams", type=int, default=4)
    decoding.add_argument("--max-new-tokens", type=int, default=64)
    decoding.add_argument("--no-repeat-ngram-size", type=int, default=3)
    decoding.add_argument("--length-penalty", type=float, default=1.0)
    decoding.add_argument("--eval-batch-size", type=int, default=8, help="prompts per generate() call")
    add_training_arguments(parser, steps=-1, epochs=1, lr=5e-5, batch_size=8, warmup=100, weight_decay=0.0)


class SummaryFormat:
    """Turns (document, summary) into token ids: training examples with summary-only labels, and prompts."""

    def __init__(self, tokenizer, separator: str, max_length: int, max_summary_tokens: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.separator_ids = tokenizer(" " + separator, add_special_tokens=False)["input_ids"]
        self.max_length = max_length
        self.max_summary_tokens = max_summary_tokens
        self.prompt_budget = max_length - len(self.separator_ids) - max_new_tokens  # document tokens in a prompt
        if self.prompt_budget < 1:
            raise WorkflowError(
                f"--max-length {max_length} leaves no room for a document after the separator "
                f"({len(self.separator_ids)} tokens) and --max-new-tokens {max_new_tokens}."
            )
        if max_length - len(self.separator_ids) - (max_summary_tokens + 1) < 1:  # + 1: the EOS after the summary
            raise WorkflowError(
                f"--max-length {max_length} leaves no room for a training document after the separator "
                f"({len(self.separator_ids)} tokens) and a summary of --max-summary-tokens {max_summary_tokens} "
                f"(+ EOS); allowed: --max-summary-tokens up to {max_length - len(self.separator_ids) - 2}."
            )

    def _ids(self, texts: list[str], prefix: str = "") -> list[list[int]]:
        return self.tokenizer([prefix + t for t in texts], add_special_tokens=False)["input_ids"]

    def training_examples(self, documents: list[str], summaries: list[str]) -> dict:
        """`document[:n] + separator + summary + EOS`; labels -100 except on the summary and EOS."""
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for document, summary in zip(self._ids(documents), self._ids(summaries, prefix=" ")):
            target = summary[: self.max_summary_tokens] + [self.tokenizer.eos_token_id]
            document = document[: self.max_length - len(self.separator_ids) - len(target)]
            context = document + self.separator_ids
            batch["input_ids"].append(context + target)
            batch["attention_mask"].append([1] * (len(context) + len(target)))
            batch["labels"].append([-100] * len(context) + target)
        return batch

    def prompts(self, documents: list[str]) -> list[list[int]]:
        """`document[:n] + separator`, leaving `max_new_tokens` of room within `max_length`."""
        return [document[: self.prompt_budget] + self.separator_ids for document in self._ids(documents)]


def load_splits(args) -> tuple:
    """(train, validation, the validation split's size before `--max-eval-samples` took its first examples)."""
    columns = [args.document_column, args.summary_column]
    if args.train_file or args.validation_file:
        if not (args.train_file and args.validation_file):
            raise WorkflowError("local summarization data needs both --train-file and --validation-file.")
        train_data = load_local_split(args.train_file, columns)
        eval_data = load_local_split(args.validation_file, columns)
    else:
        from datasets import load_dataset

        try:
            hub = load_dataset(args.dataset)
        except Exception as error:  # datasets raises many types when the Hub is unreachable
            raise WorkflowError(f"cannot load {args.dataset} ({error}); pass local files.") from error
        train_data, eval_data = hub["train"], hub["validation"]
        check_columns(train_data, columns, f"data set {args.dataset}")
    if args.max_train_samples:
        train_data = train_data.select(range(min(args.max_train_samples, len(train_data))))
    validation_size = len(eval_data)
    if args.max_eval_samples:
        eval_data = eval_data.select(range(min(args.max_eval_samples, validation_size)))
    return train_data, eval_data, validation_size


def decoding_settings(args) -> dict:
    return {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "length_penalty": args.length_penalty,
        "early_stopping": True,
        "do_sample": False,
    }


@torch.no_grad()
def generate_summaries(model, tokenizer, prompts: list[list[int]], decoding: dict, batch_size: int) -> list[str]:
    """Beam-search summaries of left-padded prompt batches; only the new tokens are decoded."""
    model.eval()
    summaries = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating summaries", unit="batch"):
        batch = tokenizer.pad({"input_ids": prompts[start : start + batch_size]}, padding_side="left",
                              return_tensors="pt").to(model.device)
        output = model.generate(**batch, **decoding, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        summaries += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return summaries


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (with stemming) over the examples."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for reference, prediction in zip(references, predictions)]
    return {name: sum(s[name].fmeasure for s in scores) / max(len(scores), 1) for name in ROUGE_TYPES}


def run(args) -> dict:
    check_training_arguments(args)
    check_positive(args, "num_beams", "max_new_tokens", "eval_batch_size", "max_summary_tokens", "max_length",
                   "max_train_samples", "max_eval_samples")
    if args.no_repeat_ngram_size < 0:
        raise WorkflowError(f"--no-repeat-ngram-size {args.no_repeat_ngram_size} must be >= 0 (0: no constraint).")
    if not math.isfinite(args.length_penalty):
        raise WorkflowError(f"--length-penalty {args.length_penalty} must be a finite number.")
    config = load_model_config(args.model)
    args.max_length = args.max_length or min(1024, model_context_length(config) or 1024)
    args.max_summary_tokens = args.max_summary_tokens or min(64, args.max_length // 2)
    check_context_length(args.max_length, config, "--max-length")
    tokenizer = load_tokenizer(args.model, args.tokenizer, needs_padding=True, pad_token=args.pad_token)
    check_language_model(args.model, config, tokenizer)
    if tokenizer.eos_token_id is None:
        raise WorkflowError("the tokenizer has no EOS token to end summaries with.")
    if args.push_to_hub:
        from .hub import check_push_target

        check_push_target(args.push_to_hub, config, args.license)
    fmt = SummaryFormat(tokenizer, args.separator, args.max_length, args.max_summary_tokens, args.max_new_tokens)
    train_data, eval_data, validation_size = load_splits(args)

    def encode(batch):
        documents = text_cells(batch, args.document_column)
        return fmt.training_examples(documents, text_cells(batch, args.summary_column))

    train_set = train_data.map(encode, batched=True, remove_columns=train_data.column_names)
    eval_set = eval_data.map(encode, batched=True, remove_columns=eval_data.column_names)
    set_seed(args.seed)  # new weights (a classifier head) start the same whatever ran before
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = MoETrainer(
        model=model,
        args=training_arguments(args),
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        processing_class=tokenizer,
        router_aux_loss=True,
        lm_loss=True,
    )
    train(trainer, args)
    eval_loss = trainer.evaluate(eval_set)["eval_loss"]

    decoding = decoding_settings(args)
    accelerator = trainer.accelerator
    documents, references = eval_data[args.document_column], eval_data[args.summary_column]
    with accelerator.split_between_processes(list(range(len(documents)))) as indices:
        local = generate_summaries(trainer.model, tokenizer, fmt.prompts([documents[i] for i in indices]), decoding,
                                   args.eval_batch_size)
    predictions = gather_object(local)
    results = {"eval_loss": eval_loss, **rouge(predictions, references)}
    record = {
        "command": "summarize",
        "dataset": args.dataset if not args.train_file else args.train_file,
        "validation_file": args.validation_file,
        "prompt_format": f"{{document}} {args.separator} {{summary}}{tokenizer.eos_token}",
        "loss": "cross-entropy on the summary and EOS tokens only",
        "max_length": args.max_length,
        "decoding": decoding,
        "eval_examples": len(predictions),
        "validation_examples": validation_size,
        "steps": trainer.state.global_step,
        "learning_rate": args.learning_rate,
        "results": results,
        "samples": [
            {"document": d, "reference": r, "generated": p}
            for d, r, p in list(zip(documents, references, predictions))[:3]
        ],
    }
    predictions_file = [{"reference": r, "generated": p} for r, p in zip(references, predictions)]
    return finish(trainer, args, record, {"results.json": record, "predictions.json": predictions_file})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="mom summarize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    record = run(parser.parse_args(argv))
    print(f"ROUGE and loss: {record['results']}; saved {record['checkpoint']}")
    return record
