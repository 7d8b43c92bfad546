"""What the training commands share: options, `TrainingArguments`, a Trainer that logs the router aux loss,
checkpoints that survive interruption, and the final save.

Runs unchanged under `accelerate launch` (DDP or FSDP over processes, GPUs or nodes): the Trainer does the
distribution; only the aux-loss logging gathers across processes itself.
"""

import argparse
import inspect
import math
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_pt_utils import nested_gather

from .common import (
    HISTORY_FILE,
    SEED_RANGE,
    WorkflowError,
    check_can_be_directory,
    check_positive,
    move_into_place,
    read_history,
    write_json,
)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"  # the Trainer writes it last in a checkpoint
def add_training_arguments(
    parser: argparse.ArgumentParser, *, steps: int, epochs: float, lr: float, batch_size: int, warmup: int,
    weight_decay: float,
):
    """Options every training command takes; the defaults are the command's recipe."""
    group = parser.add_argument_group("training")
    group.add_argument("--out", required=True, help="output directory: checkpoint-N/ while training, final/ at the end")
    group.add_argument("--max-steps", type=int, default=steps,
                       help=f"optimizer steps; -1: train for --epochs instead (default {steps})")
    group.add_argument("--epochs", type=float, default=epochs, help=f"passes over the data if --max-steps -1 "
                       f"(default {epochs:g})")
    group.add_argument("--learning-rate", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    group.add_argument("--warmup-steps", type=int, default=warmup, help="linear warmup before the cosine decay")
    group.add_argument("--batch-size", type=int, default=batch_size, help="sequences per device per micro-batch")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--weight-decay", type=float, default=weight_decay)
    group.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                       help="bf16 mixed precision; auto: when the GPU supports it")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (the last 2 are kept)")
    group.add_argument("--logging-steps", type=int, default=10)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--resume", action="store_true",
                       help="continue from the last complete checkpoint in --out (same data order and losses)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (its checkpoints when training starts, final/ at the end)")
    group.add_argument("--push-to-hub", metavar="REPO_ID", help="after training, upload the final model with its card")
    group.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    group.add_argument("--license", help="with --push-to-hub: the weights' licence as a Hub license id for the card's "
                       "metadata, e.g. `mit` (GPT-2's weights); default: none stated")
    group.add_argument("--no-progress", action="store_true", help="no progress bars (logs are printed instead)")


def check_training_arguments(args) -> None:
    check_positive(args, "batch_size", "grad_accum", "save_steps", "logging_steps")
    if args.max_steps == 0 or args.max_steps < -1:
        raise WorkflowError(f"--max-steps {args.max_steps} must be >= 1, or -1 to train for --epochs.")
    if args.max_steps == -1 and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise WorkflowError(f"--epochs {args.epochs} must be a finite number > 0.")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):  # inf or nan trains to NaN weights
        raise WorkflowError(f"--learning-rate {args.learning_rate} must be a finite number > 0.")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise WorkflowError(f"--weight-decay {args.weight_decay} must be a finite number >= 0.")
    if args.warmup_steps < 0:
        raise WorkflowError(f"--warmup-steps {args.warmup_steps} must be >= 0.")
    if args.seed not in SEED_RANGE:
        raise WorkflowError(f"--seed {args.seed} is out of range; allowed: 0..{SEED_RANGE[-1]}.")
    if args.bf16 == "yes" and not bf16_available():
        raise WorkflowError("--bf16 yes: this machine has no GPU with bf16 support; use --bf16 auto or no.")
    check_run_dir(args)
    if args.license is not None and not args.push_to_hub:
        raise WorkflowError(f"--license {args.license!r} is only used with --push-to-hub; give both or neither.")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as error:
            raise WorkflowError(f"--push-to-hub {args.push_to_hub!r} is not a valid repository id: {error}") from error


def check_run_dir(args) -> None:
    """--out is a directory, or can be made one; a run already in it (checkpoints, final/) is continued only with
    --resume and replaced only with --overwrite, never silently."""
    check_can_be_directory(args.out, f"--out {args.out}")
    if args.resume and args.overwrite:
        raise WorkflowError("--resume continues the run in --out and --overwrite replaces it; give one of them.")
    if args.resume:
        check_resumable(args)
    elif not args.overwrite and (run := run_files(args.out)):
        raise WorkflowError(
            f"--out {args.out} already holds a run ({', '.join(run)}); pass --resume to continue it or --overwrite "
            "to replace it."
        )


def run_files(out: str) -> list[str]:
    """The names of a training run's checkpoints and final model in `out` (empty if there is none)."""
    if not os.path.isdir(out):
        return []
    return sorted(name for name in os.listdir(out) if CHECKPOINT_PATTERN.match(name) or name == "final")


def check_resumable(args) -> None:
    checkpoint = last_complete_checkpoint(args.out)
    if checkpoint is None:
        raise WorkflowError(f"--resume: no complete checkpoint-N directory in {args.out} to resume from.")
    state = TrainerState.load_from_json(os.path.join(checkpoint, COMPLETE_MARKER))
    if args.max_steps > 0 and args.max_steps != state.max_steps:  # its learning-rate schedule ends at that step
        raise WorkflowError(
            f"--resume with --max-steps {args.max_steps}: the run in {args.out} was planned for {state.max_steps} "
            f"steps ({checkpoint} has taken {state.global_step}), and resuming continues its learning-rate schedule, "
            f"which ends there; resume with --max-steps {state.max_steps}, or start a new run from {checkpoint} "
            "(as --model, with another --out) to train longer."
        )


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(args, **overrides) -> TrainingArguments:
    """`TrainingArguments` from the common options (AdamW, cosine schedule with warmup, periodic checkpoints) plus
    the command's own `overrides`."""
    return TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        weight_decay=args.weight_decay,
        max_grad_norm=1.0,
        bf16=args.bf16 == "yes" or (args.bf16 == "auto" and bf16_available()),
        activation_checkpointing=args.gradient_checkpointing or None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        disable_tqdm=args.no_progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.accelerator.is_available(),  # lets `accelerate launch` run several CPU processes (gloo)
        **overrides,
    )


class LogFinalStep(TrainerCallback):
    """Logs the last step too: the Trainer logs every `logging_steps` steps only, so a run whose steps are not a
    multiple of them would leave its final losses (all of them, in a run shorter than `logging_steps`) unlogged."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True


class MoETrainer(Trainer):
    """The HF Trainer, logging the router aux loss (mean over micro-batches and processes) beside the loss.

    With `router_aux_loss=True` it asks the model for router logits in training (`output_router_logits=True`), so
    that `aux_loss` is returned and logged even where its coefficients are 0 (the models add the weighted router
    losses to the loss themselves, in training with labels); with `lm_loss=True` (causal LMs) it also logs
    the language-modelling loss alone as `lm_loss`, and evaluates the language-modelling loss only, normalised by
    the number of predicted tokens for every model, so that `eval_loss` is comparable across architectures
    (perplexity = exp(eval_loss)).
    """

    def __init__(self, *args, router_aux_loss: bool = False, lm_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        forward = inspect.signature(self.accelerator.unwrap_model(self.model).forward).parameters
        self.router_aux_loss = router_aux_loss and "output_router_logits" in forward
        self.lm_loss = lm_loss
        if lm_loss:
            # The Trainer divides a causal LM's summed loss by the labels it counts, `labels[..., 1:]` only for models
            # whose `loss_type` it recognises: `GPT2LMHeadModel` is not (its name lacks "ForCausalLM"), so its loss
            # would come out (T-1)/T too small, and comparisons with GPT-2 would be biased.
            self._loss_shifts_labels = True
        self._logged = {}  # name -> [sum tensor, count]
        self.add_callback(LogFinalStep)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.router_aux_loss and model.training:
            inputs = {**inputs, "output_router_logits": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        lm = None
        if self.lm_loss and aux is not None and "labels" in inputs:
            unwrapped = self.accelerator.unwrap_model(model)
            with torch.no_grad():
                lm = unwrapped.loss_function(
                    logits=outputs["logits"], labels=inputs["labels"], vocab_size=unwrapped.config.vocab_size
                )
        if model.training:
            for name, value in (("aux_loss", aux), ("lm_loss", lm)):
                if value is not None:
                    self._accumulate(name, value)
        elif lm is not None:
            loss = lm
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        total = self._logged.setdefault(name, [torch.zeros((), device=value.device), 0])
        total[0] += value.detach().float()
        total[1] += 1

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:
            for name, (total, count) in self._logged.items():
                if count:
                    logs[name] = nested_gather(total / count, self.args.parallel_mode).mean().item()
            self._logged = {}
        super().log(logs, start_time)


def last_complete_checkpoint(out: str) -> str | None:
    """The newest `checkpoint-N` in `out` that the Trainer finished writing (a run killed mid-save leaves a
    directory without `trainer_state.json`; `transformers.trainer_utils.get_last_checkpoint` would pick it)."""
    if not os.path.isdir(out):
        return None
    steps = [
        int(match.group(1))
        for name in os.listdir(out)
        if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isfile(os.path.join(out, name, COMPLETE_MARKER))
    ]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


class TrainingComplete(Exception):
    """Raised by `StopIfComplete` before the first step of a run that has nothing left to train."""


class StopIfComplete(TrainerCallback):
    """Stops a run resumed from a checkpoint that already took every step: transformers' Trainer would take one
    more optimizer step (at learning rate 0, still updating the optimizer state and the step count) before noticing.
    It checks once the checkpoint's model, optimizer and state are loaded, under every distribution mode."""

    def on_train_begin(self, args, state, control, **kwargs):
        if 0 < state.max_steps <= state.global_step:
            raise TrainingComplete


def train(trainer: Trainer, args) -> None:
    """`trainer.train()`, resumed from the last complete checkpoint with `--resume`; with `--overwrite`, the earlier
    run's checkpoints are removed first (the Trainer would keep the later ones, and a `--resume` would pick them)."""
    checkpoint = last_complete_checkpoint(args.out) if args.resume else None
    if checkpoint is None:
        if args.overwrite:
            remove_checkpoints(trainer, args.out)
        trainer.train()
        return
    print(f"resuming from {checkpoint}")
    stop = StopIfComplete()
    trainer.add_callback(stop)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except TrainingComplete:
        print(f"{checkpoint} has taken all {trainer.state.global_step} steps: nothing left to train")
    finally:
        trainer.remove_callback(stop)


def remove_checkpoints(trainer: Trainer, out: str) -> None:
    """Delete the `checkpoint-N` directories in `out` (by the main process, while the others wait)."""
    if trainer.is_world_process_zero():
        for name in run_files(out):
            if name != "final":  # replaced only once the new one is saved (`save_final`)
                shutil.rmtree(os.path.join(out, name))
    trainer.accelerator.wait_for_everyone()


def save_final(trainer: Trainer, out: str, source_model: str, record: dict) -> str:
    """Save the trained model, its tokenizer (the Trainer's `processing_class`) and history to `out/final` all at
    once: written aside, then renamed.

    `record` (this step: command, data, settings, results) is appended to the history read from `source_model`.
    Returns the final directory.
    """
    final = Path(out) / "final"
    staging = Path(out) / ".final.partial"
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every process takes part (FSDP gathers the weights); rank 0 writes
    if trainer.is_world_process_zero():
        write_json(staging / HISTORY_FILE, read_history(source_model) + [record])
        move_into_place(staging, final)  # an earlier final/ is replaced only once the new one is complete
    trainer.accelerator.wait_for_everyone()
    return str(final)


def finish(trainer: Trainer, args, record: dict, files: dict | None = None) -> dict:
    """End of a training command: `files` (name -> JSON value, e.g. results.json) written to `--out`, the final
    checkpoint saved with `record` in its history, and, with `--push-to-hub`, uploaded (by the main process)."""
    if trainer.is_world_process_zero():
        for name, value in (files or {}).items():
            write_json(Path(args.out) / name, value)
    record["checkpoint"] = save_final(trainer, args.out, args.model, dict(record))
    if args.push_to_hub and trainer.is_world_process_zero():
        from .hub import push

        push(record["checkpoint"], args.push_to_hub, private=args.private, license=args.license)
    return record
