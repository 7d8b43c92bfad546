"""Pieces every architecture of this package uses the same way: remote-code saving, the cache's name across
transformers versions, positions from the attention mask, last-token pooling, and the task heads (causal LM,
sequence classifier, token classifier, extractive question answering) with router losses.

The heads only differ by which router losses an architecture has: each `...ForCausalLM`,
`...ForSequenceClassification`, `...ForTokenClassification` and `...ForQuestionAnswering` sets `self.model`
(returning `MoeModelOutputWithPast`) and its output layer, and defines `router_losses` (see `RouterLossesMixin`).
They come first among the bases, so that their `forward` is used, as with transformers' `GenericFor...` heads:

    class MoMForCausalLM(CausalLMWithRouterLosses, MoMPreTrainedModel, GenerationMixin): ...
"""

import functools

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .config_checks import check_dropouts

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`. The models here
# take `cache` and return it under the installed version's field name, so the package and saved checkpoints run on
# either version.
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def accepts_past_key_values(forward):
    """Decorator: `forward(cache=...)` may also be called as `forward(past_key_values=...)`. Since transformers 5.24
    that name is deprecated (with the warning transformers' own models give); before, `generate` passes it, so it is
    renamed silently."""
    if CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return renamed


def with_cache(output_class, cache: Cache | None, **fields):
    """`output_class(...)` with the cache under the installed transformers' field name."""
    return output_class(**fields, **{CACHE_FIELD: cache})


class CheckedConfigMixin:
    """Checks the configuration (`validate_architecture`) before any layer is built: a field set after the
    configuration was constructed (`config.num_experts = 0`; `from_pretrained(path, field=value)` overrides are
    checked earlier, when the configuration loads) is caught here with a clear error instead of failing somewhere
    inside the model."""

    def __init__(self, config, *inputs, **kwargs):
        config.validate_architecture()
        super().__init__(config, *inputs, **kwargs)


class EagerExpertsMixin:
    """Models whose experts classes carry `@use_experts_implementation`: their own `forward` (transformers' "eager"
    experts implementation, here the shared dispatch of `moe_dispatch`) is the default, where transformers would pick
    "grouped_mm"; `experts_implementation=` at loading or `set_experts_implementation` still switch."""

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        return super().get_correct_experts_implementation(requested_experts or "eager")


class RemoteCodeMixin:
    """Saves checkpoints that load through every Auto class of the architecture with `trust_remote_code=True`.

    transformers records only the saved class in `config.auto_map`; this writes the whole map (config, base model and
    every task head) before saving, so any of them loads from a checkpoint of any of them. Each
    concrete class is marked for the Auto class that names it, so `save_pretrained` copies the code files.
    Subclasses list their classes in `_remote_code_classes` (`{"AutoModel": "XModel", ...}`). Loading a state dict
    without the tied head (a Trainer checkpoint being resumed) does not report it as missing.
    """

    _remote_code_classes: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for auto_class, class_name in cls._remote_code_classes.items():
            if class_name == cls.__name__:
                cls._auto_class = auto_class

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.validate_architecture()  # before the code files are copied (see `ValidatedConfigMixin`)
        self.config.validate()
        module = type(self).__module__.rsplit(".", 1)[-1]
        config_class = type(self.config)
        self.config.auto_map = {
            "AutoConfig": f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}",
            **{auto: f"{module}.{name}" for auto, name in self._remote_code_classes.items()},
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def post_init(self):
        super().post_init()
        self.register_load_state_dict_post_hook(_tied_keys_are_not_missing)


def _tied_keys_are_not_missing(model, incompatible_keys) -> None:
    """`load_state_dict` hook: a tied weight (`lm_head.weight` when `tie_word_embeddings`) is not saved, but it is not
    missing either while it is still the same tensor as its source, which was loaded.

    The Trainer resumes from a checkpoint with `model.load_state_dict(state_dict, strict=False)` and would otherwise
    warn that the tied head is missing (transformers' own tied models, GPT-2 included, do).
    """
    tied = {
        target
        for target, source in model.all_tied_weights_keys.items()
        if model.get_parameter(target) is model.get_parameter(source)
    }
    missing = incompatible_keys.missing_keys  # names from the root module: "module.lm_head.weight" under a wrapper
    missing[:] = [key for key in missing if not any(key == t or key.endswith("." + t) for t in tied)]


def last_token_pooling(
    logits: torch.Tensor,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int | None,
) -> torch.Tensor:
    """`[B, T, L]` -> `[B, L]`: the logits at each row's last real token, for left or right padding.

    The attention mask decides which tokens are real; without one, tokens equal to `pad_token_id` are padding.
    Embeddings without a mask show no padding: the last position is taken, with a warning, as transformers' own
    classifiers do.
    """
    batch, seq = logits.shape[:2]
    positions = torch.arange(seq, device=logits.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask[:, -seq:].to(logits.device).bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids.to(logits.device) != pad_token_id
    elif batch == 1 or pad_token_id is not None:
        if batch > 1:
            logger.warning_once(
                "Sequence classification on `inputs_embeds` without an `attention_mask` cannot see padding: the last "
                "position of each row is pooled. Pass the attention mask if the rows are padded."
            )
        real = torch.ones(batch, seq, dtype=torch.bool, device=logits.device)
    else:
        raise ValueError(
            "Cannot find the last token of each row of a batch larger than 1 without an attention_mask or a "
            "config.pad_token_id."
        )
    last = (positions * real).argmax(-1)
    return logits[torch.arange(batch, device=logits.device), last]


class LearnedPositionEmbedding(nn.Embedding):
    """A table of learned absolute positions that refuses a position outside it by name. `nn.Embedding` raises a
    bare IndexError on CPU (a device-side assert on GPU), e.g. when `generate` runs past `max_position_embeddings`.
    The check reads the positions' range on the host (skipped while compiling)."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel() and not torch.compiler.is_compiling():
            low, high = (int(bound) for bound in position_ids.aminmax())
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(
                    f"position {high if high >= self.num_embeddings else low} is outside the model's learned "
                    f"positions 0..{self.num_embeddings - 1} (max_position_embeddings={self.num_embeddings}); the "
                    "cached and new tokens of a sequence must fit in them."
                )
        return super().forward(position_ids)


def position_ids_from_mask(
    inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
) -> torch.Tensor:
    """`[B, T]` positions that count real tokens only (as `generate` does), so left padding does not shift them;
    `[1, T]`, the same for every row, without a 2-D mask."""
    batch, seq = inputs_embeds.shape[:2]
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; a 2-D padding mask needs one row per "
                f"sequence ({batch}) and a column per cached and current token (at least the {seq} current ones)."
            )
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    past_seen = cache.get_seq_length() if cache is not None else 0
    return torch.arange(seq, device=inputs_embeds.device).unsqueeze(0) + past_seen


class RouterLossesMixin:
    """How a model's router losses enter its task heads.

    The architecture's `PreTrainedModel` defines `router_losses(router_logits, batch_size, attention_mask)`,
    returning `(aux_loss, loss_term)`: the auxiliary loss returned to the user, and what is added to a training loss
    (the losses times their coefficients; None when every coefficient is 0). Each architecture's `router_losses` says
    what its `aux_loss` is: MoM's and ModuleFormer's balancing loss is unweighted (Mixtral's convention), MoEUT's
    entropy regulariser comes weighted by its two coefficients (FFN and attention), as the official code returns it.

    Router logits (and so `aux_loss`) are computed when `output_router_logits` asks for them (argument, else
    config), as in Mixtral. A model whose training loss includes its router losses unasked (all three architectures
    here, like their official code) defines `router_losses_with_labels` (True when a router loss has a positive
    weight): then labels suffice in training.

    The router loss term joins the loss in training mode only: they are regularisers, and an evaluation loss is the
    task's loss (MoEUT's entropy regulariser is negative, and would make exp(eval loss) understate the perplexity).

    The task heads (sequence and token classification, question answering) build their base model from the class
    attribute `base_model_class` (the architecture's `XModel`), as transformers' generic heads build theirs.
    """

    def _run_base_model(self, labels, output_router_logits, **model_kwargs) -> tuple[MoeModelOutputWithPast, bool]:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        unasked = labels is not None and self.training and getattr(self, "router_losses_with_labels", False)
        outputs = self.model(output_router_logits=output_router_logits or unasked, **model_kwargs)
        return outputs, output_router_logits

    def _add_router_losses(
        self, loss, outputs, attention_mask, micro_batch_share: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(loss + the router loss term, aux_loss)`; nothing is added without labels or router logits.

        `micro_batch_share` (this micro-batch's share of the accumulated batch's label tokens, when the Trainer
        passes `num_items_in_batch`) weights the term, so that the terms of the accumulated micro-batches sum to one
        router loss, as the next-token loss does, instead of growing with the number of accumulation steps.
        """
        if not outputs.router_logits:
            return loss, None
        batch_size = outputs.last_hidden_state.shape[0]
        if attention_mask is not None and attention_mask.dim() != 2:  # a custom 4-D mask marks no padding
            attention_mask = None
        aux_loss, loss_term = self.router_losses(outputs.router_logits, batch_size, attention_mask)
        if loss is not None and loss_term is not None and self.training:
            _warn_if_router_losses_get_no_gradient(self, loss, loss_term)
            if micro_batch_share is not None:
                loss_term = loss_term * micro_batch_share.to(loss_term.device)
            loss = loss + loss_term.to(loss.device)
        return loss, aux_loss


def _warn_if_router_losses_get_no_gradient(model, loss: torch.Tensor, loss_term: torch.Tensor) -> None:
    """Warn (once) when the router losses train nothing: reentrant activation checkpointing runs each layer without
    autograd on its first pass, so the router logits recorded there are constants. (Training still runs, on the task
    loss alone, as transformers' own MoE models do in that mode.)"""
    if not loss.requires_grad or loss_term.requires_grad:
        return
    for module in model.modules():
        checkpoint_function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and checkpoint_function is not None:
            if getattr(checkpoint_function, "keywords", {}).get("use_reentrant", False):
                logger.warning_once(
                    f"{type(model).__name__}: the router losses get no gradient under activation checkpointing with "
                    "use_reentrant=True (the router logits are recorded in a pass without autograd), so only the task "
                    "loss trains. Enable it with activation_checkpointing_kwargs={'use_reentrant': False} "
                    "(transformers' default) for the router losses to train the routers."
                )
                return


def _label_share(labels: torch.Tensor, num_items_in_batch, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """This micro-batch's next-token targets (not `-100`) over the accumulated batch's, `num_items_in_batch`."""
    targets = shift_labels if shift_labels is not None else labels[..., 1:]
    return (targets != -100).sum() / num_items_in_batch


class CausalLMWithRouterLosses(RouterLossesMixin):
    """`self.model` -> `self.lm_head`; the next-token loss (honouring the Trainer's `num_items_in_batch`) plus the
    router losses."""

    _tp_plan = {"lm_head": "colwise_gather_output"}  # tensor parallelism: the vocabulary split over the ranks

    def __init_subclass__(cls, **kwargs):
        """Name the class among transformers' causal LMs (model type -> class name), as its own models are: code
        keyed on that map treats the class as one. The Trainer's label smoothing shifts the labels only for those
        names (ours would learn to copy the input token), and the text-generation pipeline accepts them. The lazy
        auto mappings only read entries whose model type transformers itself defines, so this adds no lookup."""
        super().__init_subclass__(**kwargs)
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(cls.config_class.model_type, cls.__name__)

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels: next-token targets (`-100` = ignored); the loss honours `num_items_in_batch` from the Trainer.
        output_router_logits: return the router logits (in execution order; see the model's `router_losses`) and
            `aux_loss`. Asked or not, the weighted router losses are added to the loss in training mode with labels
            (when a coefficient is positive).
        """
        outputs, output_router_logits = self._run_base_model(
            labels,
            output_router_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        share = None
        if labels is not None and kwargs.get("num_items_in_batch") is not None:
            share = _label_share(labels, kwargs["num_items_in_batch"], kwargs.get("shift_labels"))
        loss, aux_loss = self._add_router_losses(loss, outputs, attention_mask, share)
        return with_cache(
            MoeCausalLMOutputWithPast,
            getattr(outputs, CACHE_FIELD),
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )


class SequenceClassifierWithRouterLosses(RouterLossesMixin):
    """`self.model` -> `self.score` on the last real token (left or right padding); the loss of the task type
    (single-label, regression for `num_labels=1`, multi-label) plus the router losses.

    The loss is a mean over the batch's examples, so the Trainer is told to divide it by the accumulation steps itself
    (`accepts_loss_kwargs = False`); `forward` takes `**kwargs` for attention options only.
    """

    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        r"""
        labels: class indices (`num_labels > 1`), floats for regression (`num_labels == 1`) or multi-hot floats
            (`problem_type="multi_label_classification"`). The router losses are added as in the causal LM.
        """
        outputs, _ = self._run_base_model(
            labels,
            output_router_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        pooled_logits = last_token_pooling(logits, input_ids, attention_mask, self.config.pad_token_id)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
            loss, _ = self._add_router_losses(loss, outputs, attention_mask)
        return with_cache(
            SequenceClassifierOutputWithPast,
            getattr(outputs, CACHE_FIELD),
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def classifier_dropout(config) -> nn.Dropout:
    """The token classifier's dropout: `config.classifier_dropout` where it is set (an extra config attribute), else
    0.1, as in transformers' token classifiers."""
    if getattr(config, "classifier_dropout", None) is None:
        return nn.Dropout(0.1)
    check_dropouts(config, ["classifier_dropout"])
    return nn.Dropout(config.classifier_dropout)


class TokenClassifierWithRouterLosses(RouterLossesMixin):
    """`self.model` -> `self.dropout` -> `self.score` on every token (each sees its left context only: these are
    causal models); the cross-entropy over labelled tokens (`-100` ignored) plus the router losses. The loss is a
    mean, so the Trainer divides it by the accumulation steps itself (`accepts_loss_kwargs = False`)."""

    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        self.dropout = classifier_dropout(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""
        labels: `[B, T]` class indices, `-100` for tokens without a label. The router losses are added as in the
            causal LM.
        use_cache: accepted and ignored (nothing is cached for a head that reads the whole sequence once).
        """
        outputs, _ = self._run_base_model(
            labels, output_router_logits, input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False, **kwargs,
        )  # fmt: skip
        logits = self.score(self.dropout(outputs.last_hidden_state))  # [B, T, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
            loss, _ = self._add_router_losses(loss, outputs, attention_mask)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class QuestionAnsweringWithRouterLosses(RouterLossesMixin):
    """`self.model` -> `self.qa_outputs` (two logits per token: answer start and end); the mean of the start and end
    cross-entropies (positions outside the sequence are clamped to it and ignored) plus the router losses."""

    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""
        start_positions, end_positions: `[B]` token indices of each answer's first and last token. With both, the
            loss is returned, and the router losses are added as in the causal LM.
        use_cache: accepted and ignored (nothing is cached for a head that reads the whole sequence once).
        """
        outputs, _ = self._run_base_model(
            start_positions, output_router_logits, input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False, **kwargs,
        )  # fmt: skip
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(-1)  # [B, T] each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
            loss, _ = self._add_router_losses(loss, outputs, attention_mask)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits.contiguous(),
            end_logits=end_logits.contiguous(),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
