"""Checks of the HF Trainer contract shared by the architectures' test files."""

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments


def assert_accumulation_equals_big_batch(make_model: Callable[[], PreTrainedModel], input_ids: torch.Tensor, tmp_path):
    """One SGD step on 8 rows as 2 accumulated micro-batches of 4 gives the weights of one batch of 8.

    This holds only if the loss honours the Trainer's `num_items_in_batch` (a mean per micro-batch would weight
    tokens differently). `make_model` must build identical models (the same seed) with no per-micro-batch term in
    the loss, such as a router balancing loss. Tolerance: fp32 sums in a different order, ~1e-7 relative.
    """
    data = [{"input_ids": row, "labels": row} for row in input_ids]
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
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        return model.state_dict()

    accumulated, big = train(4, 2), train(8, 1)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-6, rtol=1e-5)
