"""The task heads' contract with the HF Trainer and with transformers' conventions, shared by the three architectures.

Gradient accumulation, with the parts a plain next-token test leaves out: the router losses (added once per
micro-batch, so weighted by each micro-batch's share of the accumulated batch's label tokens) and the sequence
classifier (a per-batch mean, which the Trainer must divide by the accumulation steps itself). Each case trains one
SGD step as 2 x 4 accumulated rows and as 1 x 8 and compares the weights (fp32, 1e-6). Also: predictions, label
smoothing, activation checkpointing with router losses, custom masks, classifier pooling on embeddings, and the
token-classification and question-answering heads' losses.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_mom import (
    ModuleFormerForCausalLM,
    ModuleFormerForQuestionAnswering,
    ModuleFormerForSequenceClassification,
    ModuleFormerForTokenClassification,
    MoEUTForCausalLM,
    MoEUTForQuestionAnswering,
    MoEUTForSequenceClassification,
    MoEUTForTokenClassification,
    MoMForCausalLM,
    MoMForQuestionAnswering,
    MoMForSequenceClassification,
    MoMForTokenClassification,
)

from . import test_moduleformer, test_moeut, test_mom
from .trainer_contract import assert_accumulation_equals_big_batch

ROUTER_LOSSES_ON = {
    "mom": (test_mom.tiny_config, dict(num_modules_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)),
    "moeut": (test_moeut.tiny_config, dict(output_router_logits=True, router_aux_loss_coef=0.5)),
    "moduleformer": (test_moduleformer.tiny_config, dict(router_aux_loss_coef=0.5)),
}
NO_ROUTER_LOSS_WEIGHT = {
    "mom": dict(router_aux_loss_coef=0.0),
    "moeut": dict(router_aux_loss_coef=0.0, attention_router_aux_loss_coef=0.0),
    "moduleformer": dict(router_aux_loss_coef=0.0, concentration_loss_coef=0.0),
}
CLASSES = {
    "mom": (MoMForCausalLM, MoMForSequenceClassification),
    "moeut": (MoEUTForCausalLM, MoEUTForSequenceClassification),
    "moduleformer": (ModuleFormerForCausalLM, ModuleFormerForSequenceClassification),
}

SPAN_HEADS = {  # token classification, extractive question answering
    "mom": (MoMForTokenClassification, MoMForQuestionAnswering),
    "moeut": (MoEUTForTokenClassification, MoEUTForQuestionAnswering),
    "moduleformer": (ModuleFormerForTokenClassification, ModuleFormerForQuestionAnswering),
}


def factory(model_class, config):
    def make_model():
        torch.manual_seed(0)
        return model_class(config)

    return make_model


@pytest.mark.parametrize("arch", CLASSES)
def test_router_losses_do_not_grow_with_accumulation(arch, tmp_path):
    make_config, router_losses = ROUTER_LOSSES_ON[arch]
    config = make_config(**router_losses)
    row = torch.randint(3, 50, (10,))
    assert_accumulation_equals_big_batch(factory(CLASSES[arch][0], config), row.repeat(8, 1), tmp_path)


@pytest.mark.parametrize("arch", CLASSES)
def test_classifier_accumulation_equals_big_batch(arch, tmp_path):
    make_config, _ = ROUTER_LOSSES_ON[arch]
    config = make_config(num_labels=3)
    torch.manual_seed(1)
    ids = torch.randint(3, 50, (8, 10))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    assert_accumulation_equals_big_batch(factory(CLASSES[arch][1], config), ids, tmp_path, labels=labels)


@pytest.mark.parametrize("arch", CLASSES)
def test_evaluation_predictions_are_the_logits(arch, tmp_path):
    """The router outputs (`aux_loss`, `router_logits`) are not predictions: `compute_metrics` gets the logits alone."""
    make_config, router_losses = ROUTER_LOSSES_ON[arch]
    model = factory(CLASSES[arch][0], make_config(**router_losses))()
    ids = torch.randint(3, 50, (4, 10))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    predictions = Trainer(model=model, args=args).predict(data).predictions
    assert isinstance(predictions, np.ndarray) and predictions.shape == (4, 10, model.config.vocab_size)


@pytest.mark.parametrize("arch", CLASSES)
def test_reentrant_checkpointing_with_router_losses_warns(arch):
    """Reentrant checkpointing records the router logits without autograd: training runs (transformers' common
    tests train in that mode) but says that the router losses train nothing."""
    make_config, router_losses = ROUTER_LOSSES_ON[arch]
    model = factory(CLASSES[arch][0], make_config(**router_losses))().train()
    ids = torch.randint(3, 50, (2, 10))
    shared_logger = logging.get_logger("modeling_mom.shared_modeling")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with CaptureLogger(shared_logger) as captured:
        model(ids, labels=ids).loss.backward()
    assert captured.out == ""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    shared_logger.warning_once.cache_clear()  # a test run before may have warned once already
    with CaptureLogger(shared_logger) as captured:
        model(ids, labels=ids).loss.backward()
    assert "use_reentrant=True" in captured.out
    unweighted = factory(CLASSES[arch][0], make_config(**{**router_losses, **NO_ROUTER_LOSS_WEIGHT[arch]}))().train()
    unweighted.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    shared_logger.warning_once.cache_clear()
    with CaptureLogger(shared_logger) as captured:  # router logits asked for, but no router loss joins the loss
        unweighted(ids, labels=ids, output_router_logits=True).loss.backward()
    assert captured.out == ""


@pytest.mark.parametrize("arch", ["mom", "moeut"])
def test_router_losses_with_a_4d_attention_mask(arch):
    """A custom 4-D mask (no padding, causal) gives the same loss and router losses as no mask (it has no padding
    columns to leave out); the router losses used to slice it as a 2-D padding mask and fail."""
    make_config, router_losses = ROUTER_LOSSES_ON[arch]
    model = factory(CLASSES[arch][0], make_config(**router_losses))().train()
    ids = torch.randint(3, 50, (2, 6))
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool)).expand(2, 1, 6, 6)
    with_mask, without = model(ids, attention_mask=causal, labels=ids), model(ids, labels=ids)
    torch.testing.assert_close(with_mask.aux_loss, without.aux_loss)
    torch.testing.assert_close(with_mask.loss, without.loss)


@pytest.mark.parametrize("arch", CLASSES)
def test_label_smoothing_shifts_the_labels(arch, tmp_path):
    """With `label_smoothing_factor` the Trainer computes the loss from the logits, shifting the labels only for the
    class names it knows as causal LMs; ours must be among them, or the model learns to copy its input token."""
    from transformers.trainer_pt_utils import LabelSmoother

    make_config, _ = ROUTER_LOSSES_ON[arch]
    model = factory(CLASSES[arch][0], make_config())()
    ids = torch.randint(3, 50, (2, 10))
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    loss = Trainer(model=model, args=args).compute_loss(model, {"input_ids": ids, "labels": ids})
    logits = model(ids).logits
    torch.testing.assert_close(loss, LabelSmoother(epsilon=0.1)({"logits": logits}, ids, shift_labels=True))
    unsmoothed = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, 0.9 * unsmoothed + 0.1 * -logits[:, :-1].log_softmax(-1).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", CLASSES)
def test_classifier_on_embeddings_without_a_mask_pools_the_last_position(arch):
    """As transformers' classifiers: embeddings show no padding, so with `pad_token_id` set and no mask the last
    position is pooled (with a warning) rather than refused; a mask still finds each row's last real token."""
    make_config, _ = ROUTER_LOSSES_ON[arch]
    model = factory(CLASSES[arch][1], make_config(num_labels=3, pad_token_id=0))().eval()
    ids = torch.randint(3, 50, (2, 6))
    embeds = model.get_input_embeddings()(ids)
    shared_logger = logging.get_logger("modeling_mom.shared_modeling")
    shared_logger.warning_once.cache_clear()  # once per process: each architecture's case must see it
    with CaptureLogger(shared_logger) as captured:
        logits = model(inputs_embeds=embeds).logits
    assert "last position of each row is pooled" in captured.out
    torch.testing.assert_close(logits, model(input_ids=ids).logits)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits[1], model(ids[1:, :4]).logits[0])


@pytest.mark.parametrize("arch", CLASSES)
def test_weight_decay_spares_norms_and_biases(arch, tmp_path):
    """The Trainer decays weight matrices only, as for GPT-2: every LayerNorm gain and bias (MoM's stacked per-module
    ones included) and every bias is left out, judged by its layer type or name as transformers does."""
    make_config, router_losses = ROUTER_LOSSES_ON[arch]
    model = CLASSES[arch][0](make_config(**router_losses))
    trainer = Trainer(model=model, args=TrainingArguments(tmp_path, weight_decay=0.1, report_to=[], use_cpu=True))
    decayed = set(trainer.get_decay_parameter_names(model))
    norms = {name for name, p in model.named_parameters() if "norm" in name or "bias" in name}
    assert norms and not decayed & norms
    assert {name for name, p in model.named_parameters() if p.dim() >= 2} - norms <= decayed


@pytest.mark.parametrize("arch", CLASSES)
@pytest.mark.parametrize("head", ["token_classification", "question_answering"])
def test_token_and_answer_heads_add_the_router_losses_in_training_only(arch, head):
    """The token classifier's loss is the cross-entropy over labelled tokens, the QA head's the mean of the start and
    end cross-entropies; in training the weighted router losses are added, as in the other heads (fp32, 1e-6)."""
    make_config, router_losses = ROUTER_LOSSES_ON[arch]
    config = make_config(num_labels=3, classifier_dropout=0.0, **router_losses)
    torch.manual_seed(0)
    model = SPAN_HEADS[arch][head == "question_answering"](config)
    ids = torch.randint(3, 50, (2, 10))
    if head == "token_classification":
        targets = {"labels": torch.randint(3, (2, 10)).masked_fill(torch.rand(2, 10) < 0.3, -100)}

        def task_loss(out):
            return F.cross_entropy(out.logits.flatten(0, 1), targets["labels"].flatten())
    else:
        targets = {"start_positions": torch.tensor([1, 4]), "end_positions": torch.tensor([3, 8])}

        def task_loss(out):
            start = F.cross_entropy(out.start_logits, targets["start_positions"])
            return (start + F.cross_entropy(out.end_logits, targets["end_positions"])) / 2

    for training in (False, True):
        model.train(training)
        out = model(ids, **targets, use_cache=False)  # accepted, as transformers' heads do (nothing is cached)
        expected = task_loss(out)
        if training:
            router_logits = model.model(ids, output_router_logits=True).router_logits
            expected = expected + model.router_losses(router_logits, ids.shape[0], None)[1]
        torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("value", [1.5, -0.1, "0.1", True])
def test_a_bad_classifier_dropout_is_refused_by_name(value):
    make_config, _ = ROUTER_LOSSES_ON["moeut"]
    with pytest.raises(ValueError, match="classifier_dropout="):
        MoEUTForTokenClassification(make_config(num_labels=3, classifier_dropout=value))
