"""Checks of the HF Trainer contract shared by the architectures' test files."""

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments


def assert_accumulation_equals_big_batch(
    make_model: Callable[[], PreTrainedModel], input_ids: torch.Tensor, tmp_path, labels: torch.Tensor | None = None
):
    """One SGD step on 8 rows as 2 accumulated micro-batches of 4 gives the weights of one batch of 8.

    For a causal LM (`labels=None`: the rows are their own targets) this holds only if the loss honours the Trainer's
    `num_items_in_batch` (a mean per micro-batch would weight tokens differently); for a classifier (`labels`, one
    per row) only if the Trainer divides its per-batch mean by the accumulation steps. A router loss is a statistic
    of its batch, not a sum over tokens, so with router losses on, the 8 rows must be identical: then each
    micro-batch's router loss is the big batch's, and it holds if the micro-batches' terms sum to one router loss.
    `make_model` must build identical models (the same seed). Tolerance: fp32 sums in another order, ~1e-7 relative.
    """
    targets = input_ids if labels is None else labels
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": target}
            for row, target in zip(input_ids, targets)]  # fmt: skip
    initial = make_model().state_dict()

    def train(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = make_model()
        model.load_state_dict(initial)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run{batch_size}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            dataloader_drop_last=True,
            max_grad_norm=0.0,  # no clipping: it would scale both runs to the same norm and hide a wrong scale
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        return model.state_dict()

    accumulated, big = train(4, 2), train(8, 1)
    assert any(not torch.equal(big[name], initial[name]) for name in big)  # the step trained something
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-6, rtol=1e-5, msg=name)
