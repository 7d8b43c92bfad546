"""ModuleFormer: Shen et al., "ModuleFormer: Modularity Emerges from Mixture-of-Experts" (arXiv 2306.04640), the
architecture of IBM's MoLM models, on transformers 5.x.

A token's path, from `input_ids` to logits:

    embed_tokens(ids) (+ embed_positions(pos) with position_embedding_type="learned"; the official model has none)
    for each layer:
        x = LN_1(h)
        attention router picks k_att of the layer's attention experts; gates = softmax over all experts (top-k)
        q_e = x W_q[e] for each picked expert e; keys and values are shared: x W_k, x W_v (or x itself, MoLM)
        h = h + sum_e gate_e * (stick-breaking attention of q_e over the shared keys/values) W_o[e]
        feed-forward router picks k_mlp experts of LN_2(h)
        h = h + sum_e gate_e * W_2[e] gelu_new(W_1[e] LN_2(h))
    LN_f -> lm_head

All expert work goes through the shared dispatch (`moe_dispatch`): one sort per routing decision, reused for the
query map and the output reduce of the attention experts. The FFN experts follow transformers' experts contract
(`@use_experts_implementation`), so its `grouped_mm` / `batched_mm` kernels can replace the dispatch there. Expert
weights use the official `[E, in, out]` layout.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache
from transformers.generation import GenerationMixin
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_moduleformer import ModuleFormerConfig
from .moduleformer_modularity import ModuleFormerModularityMixin
from .moe_dispatch import (
    DispatchPlan,
    expert_mlp,
    experts_bias_flag,
    gathered_linear,
    grouped_linear,
    plan_dispatch,
    scatter_rows,
)
from .routing_losses import (
    at_least_float32,
    concentration_loss,
    mutual_information_loss,
    router_z_loss,
    switch_load_balancing_loss,
)
from .shared_modeling import (
    CausalLMWithRouterLosses,
    CheckedConfigMixin,
    EagerExpertsMixin,
    LearnedPositionEmbedding,
    QuestionAnsweringWithRouterLosses,
    RemoteCodeMixin,
    SequenceClassifierWithRouterLosses,
    TokenClassifierWithRouterLosses,
    accepts_past_key_values,
    position_ids_from_mask,
    with_cache,
)
from .stickbreaking_attention import stick_breaking_attention


class ModuleFormerRouter(nn.Module):
    """Scores a layer's experts for every token and picks the top k (official `top_k_gating`).

    "mlp": `Linear(d, router_hidden_size)` - GELU - dropout - `Linear(., E, bias=False)`; "linear":
    `Linear(d, E, bias=False)`.
    The softmax runs in fp32 over every router row, and the top k are taken among the live experts. Rows after the
    first `num_experts` belong to pruned experts: they only keep the softmax's normaliser, hence the gates of the
    remaining experts, unchanged (see `prune_experts`).

    Returns the live experts' logits `[N, E]` (fp32), the gates `[N, k]` and the selected experts `[N, k]`.
    """

    def __init__(self, config: ModuleFormerConfig, num_experts: int, num_pruned: int, num_selected: int):
        super().__init__()
        self.num_experts = num_experts
        self.num_selected = num_selected
        self.normalize = config.normalize_expert_gates
        self.fc = None
        if config.router_type == "mlp":
            self.fc = nn.Linear(config.hidden_size, config.router_hidden_size)
            self.act = nn.GELU()
            self.dropout = nn.Dropout(config.router_dropout)
        features = config.router_hidden_size if config.router_type == "mlp" else config.hidden_size
        self.out = nn.Linear(features, num_experts + num_pruned, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = hidden_states if self.fc is None else self.dropout(self.act(self.fc(hidden_states)))
        logits = at_least_float32(self.out(features))
        probs = F.softmax(logits, dim=-1)[:, : self.num_experts]
        gates, selected = probs.topk(self.num_selected, dim=-1)
        if self.normalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return logits[:, : self.num_experts], gates, selected


class ModuleFormerExperts(nn.Module):
    """A router and `E` experts, each an input projection `[d, X]` and an output projection `[X, d]`.

    The attention experts (X = attention width) and the feed-forward experts (X = intermediate size) share this
    structure, and with it pruning and extension.
    """

    def __init__(self, config: ModuleFormerConfig, num_experts: int, num_pruned: int, num_selected: int, inner: int):
        super().__init__()
        d = config.hidden_size
        self.num_experts = num_experts
        self.router = ModuleFormerRouter(config, num_experts, num_pruned, num_selected)
        self.input_proj = nn.Parameter(torch.empty(num_experts, d, inner))  # [E, in, out]
        self.output_proj = nn.Parameter(torch.empty(num_experts, inner, d))
        if config.expert_bias:
            self.input_bias = nn.Parameter(torch.zeros(num_experts, inner))
            self.output_bias = nn.Parameter(torch.zeros(num_experts, d))
        else:
            self.input_bias = self.output_bias = None

    def route(self, x: torch.Tensor) -> tuple[DispatchPlan, torch.Tensor]:
        """`[N, d]` -> the dispatch plan of each token's top-k experts and their `[N, k]` gates."""
        _, gates, selected = self.router(x)
        return plan_dispatch(selected, self.num_experts), gates.to(x.dtype)

    def project_in(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """`[N, d]` -> `[N * k, X]`, rows sorted by expert: every token through each of its experts' input map."""
        return gathered_linear(x, self.input_proj, plan, self.input_bias)

    def project_out(self, rows: torch.Tensor, plan: DispatchPlan, gates: torch.Tensor, num_tokens: int):
        """`[N * k, X]` sorted rows -> `[N, d]`: each expert's output map, gate-weighted and summed per token."""
        out = grouped_linear(rows, self.output_proj, plan, self.output_bias)
        return scatter_rows(out, plan, num_tokens, gates=gates)

    @torch.no_grad()
    def keep_experts(self, keep: torch.Tensor, keep_normaliser: bool):
        """Keep only experts `keep` (ascending); their router rows first, then (if asked) every pruned expert's row."""
        for name in ("input_proj", "output_proj", "input_bias", "output_bias"):
            if getattr(self, name) is not None:
                setattr(self, name, nn.Parameter(getattr(self, name)[keep].clone()))
        weight = self.router.out.weight
        dropped = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        dropped[keep] = False
        rows = [weight[keep]] + ([weight[dropped]] if keep_normaliser else [])
        self._set_router_rows(torch.cat(rows))
        self.num_experts = self.router.num_experts = len(keep)

    @torch.no_grad()
    def add_experts(self, new: dict[str, torch.Tensor], new_router_rows: torch.Tensor):
        """Append experts (`new` holds `[n, ...]` tensors per parameter name); their router rows go before the
        pruned experts' rows."""
        for name, tensor in new.items():
            setattr(self, name, nn.Parameter(torch.cat([getattr(self, name), tensor])))
        weight = self.router.out.weight
        live, pruned = weight[: self.num_experts], weight[self.num_experts :]
        self._set_router_rows(torch.cat([live, new_router_rows, pruned]))
        self.num_experts = self.router.num_experts = self.num_experts + new_router_rows.shape[0]

    def _set_router_rows(self, weight: torch.Tensor):
        self.router.out.weight = nn.Parameter(weight.clone())
        self.router.out.out_features = weight.shape[0]


class ModuleFormerAttention(ModuleFormerExperts):
    """Mixture of attention heads (MoA): per-expert query and output projections, shared keys and values.

    Each token's query goes through each of its k experts' query maps; the k queries attend over the same keys
    and values (one cache slot per layer), and the k outputs go through their experts' output maps, gate-weighted.
    """

    def __init__(self, config: ModuleFormerConfig, layer_idx: int, num_experts: int, num_pruned: int):
        super().__init__(
            config, num_experts, num_pruned, config.num_attention_experts_per_tok, config.attention_hidden_size
        )
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_function = config.attention_function
        self.chunk_size = config.stick_breaking_chunk_size
        self.recompute_weights = config.stick_breaking_recompute_weights
        if config.shares_hidden_states_as_kv:
            self.k_proj = self.v_proj = None
        else:
            self.k_proj = nn.Linear(config.hidden_size, config.attention_hidden_size)
            self.v_proj = nn.Linear(config.hidden_size, config.attention_hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the output `[B, T, d]` and, if asked, the weights of every head of every selected expert
        `[B, heads * k, T, S]` (head h of a token's j-th expert at index `h * k + j`)."""
        batch, seq, d = hidden_states.shape
        x = hidden_states.reshape(-1, d)
        num_tokens, k = x.shape[0], self.router.num_selected
        plan, gates = self.route(x)
        # map: [N * k, A] sorted by expert -> (token, slot) order (every pair is kept: no SKIP here) -> [B, H, k, T, hd]
        query_rows = self.project_in(x, plan)
        query = query_rows.new_empty(num_tokens * k, query_rows.shape[-1]).index_copy(0, plan.flat_index, query_rows)
        query = query.view(batch, seq, k, self.num_heads, self.head_dim).permute(0, 3, 2, 1, 4)

        key, value = self._keys_and_values(hidden_states, cache)  # [B, H, S, head_dim] each

        attn_output, attn_weights = self._attend(query, key, value, key_padding_mask, output_attentions)
        # reduce: [B, H, k, T, head_dim] in (token, slot) order -> sorted by expert, same plan as the map
        attn_output = attn_output.permute(0, 3, 2, 1, 4).reshape(num_tokens * k, -1)
        out = self.project_out(attn_output.index_select(0, plan.flat_index), plan, gates, num_tokens)
        return out.view(batch, seq, d), attn_weights

    def _keys_and_values(self, hidden_states, cache):
        """Keys and values of the current positions, after the cached ones. When both are the hidden states (the
        MoLM layout) the cache holds them once: its values are stored zero wide (a `QuantizedCache`, which cannot
        quantize an empty tensor, holds the keys twice)."""
        batch, seq, _ = hidden_states.shape
        key = hidden_states if self.k_proj is None else self.k_proj(hidden_states)
        key = key.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, head_dim]
        if self.v_proj is None:
            if isinstance(cache, QuantizedCache):  # it cannot quantize zero-wide values: it holds the keys twice
                key, _ = cache.update(key, key, self.layer_idx)
            elif cache is not None:
                key, _ = cache.update(key, key[..., :0], self.layer_idx)
            return key, key
        value = self.v_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        return key, value

    def _attend(self, query, key, value, key_padding_mask, output_weights):
        """`[B, H, k, T, head_dim]` queries over `[B, H, S, head_dim]` keys/values -> output, weights or None."""
        if self.attention_function != "softmax":
            return stick_breaking_attention(
                query,
                key,
                value,
                key_padding_mask,
                attend_current=self.attention_function == "stickbreaking",
                remainder_to_current=self.attention_function == "stickbreaking_2024",
                chunk_size=self.chunk_size,
                output_weights=output_weights,
                recompute_weights=self.recompute_weights,
            )
        batch, heads, k, seq, head_dim = query.shape
        key_len = key.shape[-2]
        key_pos = torch.arange(key_len, device=query.device)
        query_pos = key_pos[key_len - seq :, None]
        allowed = key_pos <= query_pos  # [T, S]
        if key_padding_mask is not None:  # a padding query still sees itself, so no row is empty
            allowed = allowed & (key_padding_mask.bool()[:, None, None, :] | (key_pos == query_pos))
        if output_weights:  # eager, to return the weights
            if allowed.dim() == 4:
                allowed = allowed.unsqueeze(2)  # [B, 1, 1, T, S]
            scores = (query @ key.unsqueeze(2).transpose(-1, -2)) * head_dim**-0.5
            weights = F.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).flatten(1, 2)
            return weights.view_as(scores).to(value.dtype) @ value.unsqueeze(2), weights
        out = F.scaled_dot_product_attention(
            query.reshape(batch, heads * k, seq, head_dim), key, value, attn_mask=allowed, enable_gqa=k > 1
        )
        return out.view(batch, heads, k, seq, head_dim), None


@use_experts_implementation(is_transposed=True, has_gate=False)
class ModuleFormerMoE(ModuleFormerExperts):
    """Feed-forward experts `W_2[e] act(W_1[e] x)`, no bias unless `expert_bias`; output = gate-weighted sum.

    The layer routes (`self.router`), then calls it with transformers' experts contract, so that
    `model.set_experts_implementation("grouped_mm" | "batched_mm")` switches from the shared dispatch (`forward`,
    "eager", the default) to transformers' kernels. Those read the weights as `up_proj` / `down_proj` (and
    `*_bias`): aliases of `input_proj` / `output_proj`, the names this model shares with its attention experts.
    """

    has_bias = experts_bias_flag("expert_bias")
    up_proj = property(lambda self: self.input_proj)
    down_proj = property(lambda self: self.output_proj)
    up_proj_bias = property(lambda self: self.input_bias)
    down_proj_bias = property(lambda self: self.output_bias)

    def __init__(self, config: ModuleFormerConfig, num_experts: int, num_pruned: int):
        super().__init__(config, num_experts, num_pruned, config.num_experts_per_tok, config.intermediate_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """`[N, d]` tokens, `[N, k]` experts and gates -> `[N, d]`."""
        plan = plan_dispatch(top_k_index, self.num_experts)
        weights = (self.input_proj, self.output_proj, self.act_fn)
        return expert_mlp(hidden_states, plan, *weights, top_k_weights, self.input_bias, self.output_bias)


class ModuleFormerDecoderLayer(GradientCheckpointingLayer):
    """Pre-LN block: `h + MoA(LN_1(h))`, then `+ MoE(LN_2(.))`, dropout on both residual branches."""

    def __init__(self, config: ModuleFormerConfig, layer_idx: int):
        super().__init__()
        num_attention, pruned_attention, num_mlp, pruned_mlp = config.layer_experts(layer_idx)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attn = ModuleFormerAttention(config, layer_idx, num_attention, pruned_attention)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = ModuleFormerMoE(config, num_mlp, pruned_mlp)
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states), key_padding_mask, cache, output_attentions
        )
        hidden_states = hidden_states + self.dropout(attn_output)
        return hidden_states + self.dropout(self._feed_forward(self.post_attention_layernorm(hidden_states)))

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Route, then call the experts. An adapter on the expert weights (peft's `target_parameters`) wraps
        `self.mlp` in a module that hides its attributes, so the router is read from the wrapped module."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [B * T, d]
        experts = self.mlp.get_base_layer() if hasattr(self.mlp, "get_base_layer") else self.mlp
        _, gates, selected = experts.router(x)
        return self.mlp(x, selected, gates.to(x.dtype)).view_as(hidden_states)


class ModuleFormerPreTrainedModel(
    CheckedConfigMixin, RemoteCodeMixin, EagerExpertsMixin, ModuleFormerModularityMixin, PreTrainedModel
):
    config_class = ModuleFormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ModuleFormerDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": ModuleFormerDecoderLayer,
        "attentions": OutputRecorder(ModuleFormerAttention, index=1),
        "router_logits": OutputRecorder(ModuleFormerRouter, index=0),
    }
    _remote_code_classes = {
        "AutoModel": "ModuleFormerModel",
        "AutoModelForCausalLM": "ModuleFormerForCausalLM",
        "AutoModelForSequenceClassification": "ModuleFormerForSequenceClassification",
        "AutoModelForTokenClassification": "ModuleFormerForTokenClassification",
        "AutoModelForQuestionAnswering": "ModuleFormerForQuestionAnswering",
    }

    def init_continuous_batching(self, *args, **kwargs):
        """Refused before any request is queued (continuous batching logs a failing forward and returns nothing)."""
        refuse_cache("continuous batching (generate_batch, cache_implementation='paged') keeps them paged")

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        """transformers' distributed loading, refusing expert parallelism beside FSDP. The FFN router is stored in
        the experts module (`layers.*.mlp.router`), which FSDP shards with the experts on the expert-parallel group:
        it would be gathered only for the experts' call (after routing) and its gradient reduced over that group,
        not over the ranks' batches."""
        if distributed_config is not None and distributed_config.ep_size > 1 and distributed_config.dp_size > 1:
            raise ValueError(
                f"ModuleFormer's expert parallelism (ep_size={distributed_config.ep_size}) runs with tensor "
                f"parallelism only, not beside FSDP (fsdp_size={distributed_config.fsdp_size}, dp_replicate_size="
                f"{distributed_config.dp_replicate_size}): its FFN router lives in the experts module. Use "
                "DistributedConfig(tp_size=N, ep_size=N), or FSDP without ep_size."
            )
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, **kwargs):
        """transformers' `from_pretrained`, refusing an official ModuleFormer / MoLM checkpoint (IBM's layout).

        Official configs carry the same model type, so without this check they would load with none of their
        weights (the names differ): a randomly initialised model and a logged warning. They are converted once
        instead (`conversion/molm_to_moduleformer.py`), or run with IBM's own code (`trust_remote_code=True`).
        """
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        official = [key for key in info["unexpected_keys"] if key.startswith("transformer.h.")]
        if official:
            raise ValueError(
                f"{pretrained_model_name_or_path} is an official ModuleFormer/MoLM checkpoint: its weights are named "
                f"in IBM's layout ({official[0]!r}, ...), which this package does not load directly. Convert it "
                "once: python -m conversion.molm_to_moduleformer --src DIR --out OUT (DIR: a local copy of the "
                "checkpoint), or load it with trust_remote_code=True to run IBM's own code."
            )
        return (model, info) if output_loading_info else model

    @property
    def router_losses_with_labels(self) -> bool:
        """In training with labels, the router losses join the loss unasked when one has a positive weight (as the
        official model always adds its auxiliary loss)."""
        return self.config.router_aux_loss_coef > 0 or self.config.concentration_loss_coef > 0

    def router_losses(self, router_logits, batch_size, attention_mask):
        """`config.aux_loss_type`'s balancing loss summed over the routers, returned as `aux_loss`; the loss term
        adds it times `router_aux_loss_coef` and the concentration loss times `concentration_loss_coef` (None when
        both are 0)."""
        aux_loss, concentration = moduleformer_router_losses(self.config, router_logits, attention_mask)
        if not self.router_losses_with_labels:
            return aux_loss, None
        config = self.config
        return aux_loss, config.router_aux_loss_coef * aux_loss + config.concentration_loss_coef * concentration

    @torch.no_grad()
    def _init_weights(self, module):
        """The official scheme: linear layers and embeddings Normal(0, initializer_range), zero biases, and the
        experts' projections as `_init_expert_projection` draws them."""
        super()._init_weights(module)
        if isinstance(module, ModuleFormerExperts):
            self._init_expert_projection(module.input_proj)
            self._init_expert_projection(module.output_proj)
            if module.input_bias is not None:
                init.zeros_(module.input_bias)
                init.zeros_(module.output_bias)

    @staticmethod
    def _init_expert_projection(weight: torch.Tensor) -> torch.Tensor:
        """A `[E, in, out]` expert bank drawn from U(-1/in, 1/in), as the official `ParallelExperts.reset_parameters`
        does (1/in, not 1/sqrt(in): std 5.6e-4 for MoLM's 1024 inputs)."""
        bound = 1.0 / weight.shape[1]
        return init.uniform_(weight, -bound, bound)

    def _expert_pools(self) -> list[tuple[int, str, ModuleFormerExperts]]:
        """`(layer index, "attention" | "mlp", experts)` for every router, in the order the routers run."""
        return [
            (layer_idx, kind, pool)
            for layer_idx, layer in enumerate(self.base_model.layers)
            for kind, pool in (("attention", layer.self_attn), ("mlp", layer.mlp))
        ]


def refuse_cache(reason: str):
    raise ValueError(
        "ModuleFormer keeps its keys and values in a DynamicCache, or another cache whose layers grow with the "
        f"sequence (its attention reads every cached key and a 2-D key padding mask); {reason}. Generate with the "
        "default cache (cache_implementation=None or 'dynamic')."
    )


def key_padding_mask_from(attention_mask: torch.Tensor | None, batch: int, key_len: int) -> torch.Tensor | None:
    """The `[B, S]` boolean mask of real keys (cached and current), or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, key_len):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; ModuleFormer needs a 2-D padding mask of shape "
            f"(batch, past + current length) = {(batch, key_len)}, 1 for real tokens and 0 for padding."
        )
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


class ModuleFormerModel(ModuleFormerPreTrainedModel):
    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":
            self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.embd_dropout)
        self.layers = nn.ModuleList(ModuleFormerDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        position_ids: used only with `position_embedding_type="learned"` (default: counted over real tokens, so
            left padding does not shift them); stick-breaking needs no positions, so left padding is exact without
            them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        if cache is not None and not isinstance(cache, Cache):
            refuse_cache(f"got a {type(cache).__name__}, which is no Cache (legacy tuples of keys and values are not "
                         "taken: wrap them with DynamicCache(...))")
        if cache is not None and cache.is_compileable:
            refuse_cache(f"got {type(cache).__name__}, whose layers have a fixed size or are paged")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # one slot per layer
        past_seen = cache.get_seq_length() if cache is not None else 0
        batch, seq = inputs_embeds.shape[:2]
        hidden_states = inputs_embeds
        if hasattr(self, "embed_positions"):
            if position_ids is None:
                position_ids = position_ids_from_mask(inputs_embeds, attention_mask, cache)
            hidden_states = hidden_states + self.embed_positions(position_ids)
        hidden_states = self.dropout(hidden_states)
        key_padding_mask = key_padding_mask_from(attention_mask, batch, past_seen + seq)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                key_padding_mask=key_padding_mask,
                cache=cache,
                output_attentions=output_attentions,
                **kwargs,
            )
        last_hidden_state = self.norm(hidden_states)
        return with_cache(MoeModelOutputWithPast, cache if use_cache else None, last_hidden_state=last_hidden_state)


def moduleformer_router_losses(
    config: ModuleFormerConfig, router_logits, attention_mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(aux_loss, concentration)` summed over the routers (`router_logits` alternates attention, feed-forward).

    `aux_loss` is `config.aux_loss_type`'s balancing loss, computed per router as in the official code since the two
    routers of a layer (and pruned layers) have different expert counts.
    """
    aux_loss = concentration = 0.0
    for idx, logits in enumerate(router_logits):
        if config.aux_loss_type == "mi":
            aux_loss = aux_loss + mutual_information_loss(logits, attention_mask)
        else:
            k = config.num_attention_experts_per_tok if idx % 2 == 0 else config.num_experts_per_tok
            aux_loss = aux_loss + switch_load_balancing_loss([logits], k, attention_mask)
            aux_loss = aux_loss + config.router_z_loss_coef * router_z_loss(logits, attention_mask)
        if config.concentration_loss_coef > 0:
            concentration = concentration + concentration_loss(logits, attention_mask)
    return aux_loss, concentration


class ModuleFormerForCausalLM(CausalLMWithRouterLosses, ModuleFormerPreTrainedModel, GenerationMixin):
    """ModuleFormer with its language-model head (untied in MoLM; tied if `tie_word_embeddings`).

    `router_logits` holds every router's logits (per layer: attention router, then feed-forward router); in training
    with labels, the router losses with a positive coefficient (`router_aux_loss_coef`, `concentration_loss_coef`)
    are computed and added whether or not they are returned (see `router_losses`).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        self.model = ModuleFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class ModuleFormerForSequenceClassification(SequenceClassifierWithRouterLosses, ModuleFormerPreTrainedModel):
    """ModuleFormer with a linear head on the last non-padding token (GLUE-style classification and regression)."""

    base_model_class = ModuleFormerModel


class ModuleFormerForTokenClassification(TokenClassifierWithRouterLosses, ModuleFormerPreTrainedModel):
    """ModuleFormer with a linear head on every token (e.g. named entities), after `classifier_dropout(config)`."""

    base_model_class = ModuleFormerModel


class ModuleFormerForQuestionAnswering(QuestionAnsweringWithRouterLosses, ModuleFormerPreTrainedModel):
    """ModuleFormer with a linear head giving each token an answer-start and an answer-end logit (extractive QA)."""

    base_model_class = ModuleFormerModel


__all__ = [
    "ModuleFormerPreTrainedModel", "ModuleFormerModel", "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification", "ModuleFormerForTokenClassification", "ModuleFormerForQuestionAnswering",
]  # fmt: skip
