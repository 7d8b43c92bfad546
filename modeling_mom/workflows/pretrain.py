"""`mom pretrain`: continued pretraining of a causal LM (the MoM recipe's second phase: after seeding from a vanilla
model, routers and modules are trained together).

    mom pretrain --model runs/gpt2-mom --out runs/gpt2-mom-owt                      # OpenWebText, streamed
    mom pretrain --model DIR --out OUT --dataset corpus.txt --validation-file held_out.txt --block-size 512
    accelerate launch -m modeling_mom.workflows.cli pretrain --model DIR --out OUT  # after `accelerate config`
    accelerate launch --multi_gpu --num_processes 2 -m modeling_mom.workflows.cli pretrain ...  # 2 processes, even
                                                                                # on CPUs (DDP over gloo)

Documents are tokenised, joined with EOS and cut into blocks of `--block-size` tokens (no padding). AdamW
(beta2 0.95, eps 1e-5, weight decay 0.1, clipping 1.0) with linear warmup and cosine decay, as in the MoM paper's
pretraining script. The router aux loss is logged beside the LM loss. Checkpoints every `--save-steps`; `--resume`
continues from the last complete one with the same data order, giving the same losses as an uninterrupted run.
"""

import argparse
import math

import torch
from transformers import AutoModelForCausalLM, default_data_collator, set_seed

from .common import (
    WorkflowError,
    check_columns,
    check_context_length,
    check_language_model,
    check_positive,
    is_local_data,
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

DEFAULT_DATASET = "Skylion007/openwebtext"
STREAM_SHUFFLE_BUFFER = 10_000  # documents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id (e.g. from `mom convert`)")
    parser.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: the model's)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=DEFAULT_DATASET,
                      help=f"Hub data set (streamed; default {DEFAULT_DATASET}) or a local .txt/.json/.jsonl/.csv file")
    data.add_argument("--dataset-config", help="Hub data set configuration name")
    data.add_argument("--split", default="train", help="Hub split to train on")
    data.add_argument("--text-column", default="text")
    data.add_argument("--validation-file", help="local held-out file (default: the first --eval-blocks blocks)")
    data.add_argument("--eval-blocks", type=int, default=64, help="blocks held out from the data's start (0: none)")
    data.add_argument("--block-size", type=int, help="tokens per training block (default: min(1024, model max))")
    data.add_argument("--no-streaming", action="store_true", help="download a Hub data set instead of streaming it")
    add_training_arguments(parser, steps=5000, epochs=1, lr=1e-3, batch_size=8, warmup=500, weight_decay=0.1)


def pack_blocks(data, tokenizer, text_column: str, block_size: int):
    """Tokenise documents, append EOS to each, concatenate, and cut into `block_size`-token blocks with labels."""
    if tokenizer.eos_token_id is None:
        raise WorkflowError("the tokenizer has no EOS token to separate documents with.")

    def group(batch):
        ids = []
        for encoded in tokenizer(text_cells(batch, text_column), add_special_tokens=False)["input_ids"]:
            ids += encoded + [tokenizer.eos_token_id]
        blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    data = data.select_columns([text_column])
    return data.map(group, batched=True, remove_columns=[text_column])


def split_stream(raw, tokenizer, args, block_size: int):
    """(train, eval) blocks of a streamed data set: `--eval-blocks` blocks of its first documents in stored order,
    and the later documents, shuffled, for training.

    The split is made before shuffling, by documents: the Trainer reshuffles a streamed data set at every pass
    (`set_epoch`), so blocks held out from a shuffled stream would be among the training blocks from the second pass
    on. Reads the first documents once, to count how many the held-out blocks take.
    """
    needed, tokens, documents = args.eval_blocks * block_size, 0, 0
    for document in raw.iter(batch_size=1):
        if tokens >= needed:
            break
        text = text_cells(document, args.text_column)[0]
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS, as pack_blocks
        documents += 1
    else:
        raise WorkflowError(
            f"--dataset {args.dataset} holds {tokens} tokens; holding out --eval-blocks {args.eval_blocks} of "
            f"{block_size} tokens leaves none to train on. Lower --eval-blocks or --block-size."
        )
    held_out = pack_blocks(raw.take(documents), tokenizer, args.text_column, block_size).take(args.eval_blocks)
    train = raw.skip(documents).shuffle(seed=args.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    return pack_blocks(train, tokenizer, args.text_column, block_size), held_out


def load_blocks(args, tokenizer, block_size: int):
    """(train, eval or None) blocks, from a local file or a (streamed) Hub data set."""
    if is_local_data(args.dataset):
        raw = load_local_split(args.dataset, [args.text_column])
        streaming = False
    else:
        from datasets import load_dataset

        streaming = not args.no_streaming
        try:
            raw = load_dataset(args.dataset, args.dataset_config, split=args.split, streaming=streaming)
        except Exception as error:  # datasets raises many types for a bad name, config or split
            raise WorkflowError(f"--dataset {args.dataset}: cannot load it ({error}).") from error
        check_columns(raw, [args.text_column], f"data set {args.dataset}")
    if streaming and not args.validation_file and args.eval_blocks > 0:
        return split_stream(raw, tokenizer, args, block_size)
    if streaming:
        raw = raw.shuffle(seed=args.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    blocks = pack_blocks(raw, tokenizer, args.text_column, block_size)
    if args.validation_file:
        held_out = pack_blocks(load_local_split(args.validation_file, [args.text_column]), tokenizer,
                               args.text_column, block_size)
        if len(held_out) == 0:
            raise WorkflowError(f"--validation-file {args.validation_file} has fewer than --block-size {block_size} "
                                "tokens, so not one block to evaluate on; give more text or a smaller --block-size.")
        return blocks, held_out
    if args.eval_blocks == 0:
        return blocks, None
    if len(blocks) <= args.eval_blocks:
        raise WorkflowError(
            f"--dataset {args.dataset} gives {len(blocks)} blocks of {block_size} tokens; holding out "
            f"--eval-blocks {args.eval_blocks} leaves none to train on. Lower --eval-blocks or --block-size."
        )
    return blocks.select(range(args.eval_blocks, len(blocks))), blocks.select(range(args.eval_blocks))


def run(args, callbacks=None) -> dict:
    """Check every input, train, evaluate, save `OUT/final`; returns this step's record (settings and results)."""
    check_training_arguments(args)
    check_positive(args, "block_size")
    if args.max_steps == -1 and not is_local_data(args.dataset) and not args.no_streaming:
        raise WorkflowError("a streamed data set has no length: give --max-steps (or --no-streaming with --epochs).")
    if args.eval_blocks < 0:
        raise WorkflowError(f"--eval-blocks {args.eval_blocks} must be >= 0.")
    config = load_model_config(args.model)
    block_size = args.block_size or min(1024, model_context_length(config) or 1024)
    check_context_length(block_size, config, "--block-size")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    check_language_model(args.model, config, tokenizer)
    if args.push_to_hub:
        from .hub import check_push_target

        check_push_target(args.push_to_hub, config, args.license)
    train_blocks, eval_blocks = load_blocks(args, tokenizer, block_size)
    if hasattr(train_blocks, "__len__") and len(train_blocks) == 0:
        raise WorkflowError(f"--dataset {args.dataset} has fewer than --block-size {block_size} tokens.")

    set_seed(args.seed)  # new weights (a classifier head) start the same whatever ran before
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = MoETrainer(
        model=model,
        args=training_arguments(args, adam_beta2=0.95, adam_epsilon=1e-5, include_num_input_tokens_seen="all"),
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        router_aux_loss=True,
        lm_loss=True,
    )
    results = {}
    if eval_blocks is not None and not args.resume:  # the seeded model's loss, to see what training changed
        results["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    train(trainer, args)
    results.update(train_loss=last_logged(trainer, "loss"), train_aux_loss=last_logged(trainer, "aux_loss"))
    if eval_blocks is not None:
        results["eval_loss"] = trainer.evaluate()["eval_loss"]
        results["perplexity"] = math.exp(min(results["eval_loss"], 50.0))
    batch_size = trainer.args.train_batch_size * args.grad_accum * trainer.args.world_size
    record = {
        "command": "pretrain",
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "block_size": block_size,
        "validation_file": args.validation_file,
        "held_out": held_out_data(args) if eval_blocks is not None else None,
        "steps": trainer.state.global_step,
        "tokens": trainer.state.num_input_tokens_seen,  # an epoch's last batch may be partial
        "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps,
        "batch_size": batch_size,
        "results": results,
    }
    return finish(trainer, args, record)


def held_out_data(args) -> str:
    """What the evaluation loss was measured on, in words for the model card."""
    if args.validation_file:
        return f"`{args.validation_file}`"
    return f"the first {args.eval_blocks} blocks of `{args.dataset}`, not trained on"


def last_logged(trainer, key: str) -> float | None:
    """The last value of `key` in the Trainer's log history: the final logging window's (`MoETrainer` logs the
    last step too)."""
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return values[-1] if values else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="mom pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    record = run(parser.parse_args(argv))
    print(f"saved {record['checkpoint']}; results: {record['results']}")
    return record
