"""MoEUT: Csordás, Irie, Schmidhuber, Potts, Manning, "MoEUT: Mixture-of-Experts Universal Transformers", NeurIPS 2024
(arXiv 2405.16039), on transformers 5.x.

A token's path, from `input_ids` to logits:

    x = embed_tokens(ids)                                  (positions: partial RoPE in attention; GPT-2 seeds may
                                                            add learned absolute positions here instead)
    for step in range(num_hidden_layers):                  the G shared layers in the order A, B, ..., A, B, ...
        layer = layers[step % G]
        x = x + SwitchHead(q/k and routers read LN1(x), values read x)     ("peri" LayerNorm)
        x = x + sigma-MoE(router reads LN2(x), experts read x)
    logits = lm_head(norm(x))                              (by default untied, with bias)

SwitchHead: shared dense Q and K; each head's value and output projections are mixtures of that head's experts,
chosen per token by sigmoid top-k routers (no renormalisation). The sigma-MoE feed-forward block is a pool of small
ReLU experts with a sigmoid top-k router. All expert work goes through the shared dispatch (`moe_dispatch`): one plan
(sort) per routing decision, per-expert grouped matmuls, the gate applied to the small hidden, one scatter-add.
The routers' logits are returned (not stored on modules) and turned into the paper's entropy regulariser by the
heads, so it is exact under gradient checkpointing. Each unrolled step has its own KV-cache slot.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.moe import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeModelOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_moeut import MoEUTConfig
from .moe_dispatch import (
    bag_mixture,
    bag_mixture_wins,
    expert_mlp,
    experts_bias_flag,
    gather_rows,
    gathered_linear,
    grouped_linear,
    plan_dispatch,
    scatter_rows,
    sorted_gates,
)
from .routing_losses import at_least_float32, sequence_entropy_loss
from .shared_modeling import (
    CACHE_FIELD,
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


class MoEUTRotaryEmbedding(nn.Module):
    """RoPE tables for the first `config.num_rotary_dims` dims of each head ("rotate half" convention), with
    transformers' RoPE scalings (`config.rope_parameters`) computed for that width.

    The frequencies are computed in fp32 at every call (a few numbers) rather than kept in a buffer, which
    `model.to(torch.bfloat16)` would round: at the 244M preset that shifts phases by up to 0.45 rad within 1024
    positions. Dynamic NTK scaling takes the call's largest position, so it is a function of the positions alone
    (transformers' buffer only grows and resets; within one sequence the two agree).
    """

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.rotary_config = config.rotary_config()  # the RoPE of `config` when the model was built
        self.rope_type = self.rotary_config.rope_parameters["rope_type"]

    @property
    def inv_freq(self) -> torch.Tensor:
        """The inverse frequencies at the trained context (`max_position_embeddings`), `[num_rotary_dims / 2]`."""
        return self.frequencies(torch.device("cpu"), torch.float32)[0]

    def frequencies(
        self, device: torch.device, dtype: torch.dtype, seq_len: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """Inverse frequencies `[num_rotary_dims / 2]` and the cos/sin scale (yarn's and longrope's attention
        factor; 1 otherwise), for positions below `seq_len` (only dynamic and longrope scaling read it)."""
        if self.rope_type == "default":
            rotary = self.rotary_config.head_dim
            exponents = torch.arange(0, rotary, 2, dtype=dtype, device=device) / max(rotary, 1)
            return 1.0 / self.rotary_config.rope_theta**exponents, 1.0
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.rotary_config, device, seq_len=seq_len)
        return inv_freq.to(device=device, dtype=dtype), scaling

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T]` positions -> cos, sin `[B, T, num_rotary_dims]`."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 in a float64 model
        seq_len = position_ids.max() + 1 if self.rope_type in ("dynamic", "longrope") else None
        inv_freq, scaling = self.frequencies(x.device, dtype, seq_len)
        freqs = position_ids[..., None].to(dtype) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first `cos.shape[-1]` dims of `x` `[B, H, T, dh]`; the other dims are position-free."""
    rotary = cos.shape[-1]
    if rotary == 0:
        return x
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
    return torch.cat((rotated, x_pass), dim=-1)


class MoEUTRouter(nn.Module):
    """Sigmoid top-k router over `num_groups` independent groups of `num_choices` (one group per head for SwitchHead).

    Returns the fp32 logits (`[N, C]`, or `[N, groups, C]` with several groups; recorded as `router_logits`), the
    chosen sigmoid scores `[N, groups * k]` (not renormalised) and the choices as indices into the flattened
    `groups * C` experts `[N, groups * k]` (group g's expert e is `g * C + e`, the official layout).
    `renorm_rows` selects SwitchHead's initialisation (each row back to its own std; see `_init_router`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_groups: int,
        num_choices: int,
        num_selected: int,
        expert_dropout: float,
        renorm_rows: bool = False,
    ):
        super().__init__()
        self.renorm_rows = renorm_rows
        self.num_groups = num_groups
        self.num_choices = num_choices
        self.num_selected = num_selected
        self.expert_dropout = expert_dropout
        self.weight = nn.Parameter(torch.empty(num_groups * num_choices, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[N, d]` -> logits, gates, choices. The groups are those of `self.weight`'s rows: under tensor parallelism
        this rank's heads."""
        logits = at_least_float32(F.linear(hidden_states, self.weight))
        logits = logits.view(hidden_states.shape[0], -1, self.num_choices)  # [N, groups, C]
        candidates = logits  # the sigmoid's order, without its fp32 ties above ~17 (the training code's choice)
        if self.training and self.expert_dropout > 0:
            dropped = torch.rand_like(logits) < self.expert_dropout
            candidates = logits.masked_fill(dropped, float("-inf"))
        with torch.no_grad():
            selected = candidates.topk(self.num_selected, dim=-1, sorted=False).indices  # [N, groups, k]
        gates = logits.gather(-1, selected).sigmoid().flatten(1)
        offsets = torch.arange(selected.shape[1], device=selected.device)[:, None] * self.num_choices
        logits = logits.squeeze(1) if self.num_groups == 1 else logits
        return logits, gates, (selected + offsets).flatten(1)


@use_experts_implementation(is_transposed=True, has_gate=False)
class MoEUTExperts(nn.Module):
    """The sigma-MoE expert pool: expert e is `down_proj[e]^T act(up_proj[e]^T x)` (official `keys` / `values`).

    `forward` (the "eager" experts implementation, the default) is the shared dispatch: one sort, a grouped matmul
    per projection, the gate applied to the `moe_intermediate_size`-wide hidden, one scatter-add.
    `model.set_experts_implementation("grouped_mm" | "batched_mm")` switches to transformers' kernels.
    """

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.up_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.moe_intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.moe_intermediate_size, config.hidden_size))
        if config.mlp_bias:
            self.up_proj_bias = nn.Parameter(torch.zeros(config.num_experts, config.moe_intermediate_size))
            self.down_proj_bias = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.act_fn = ACT2FN[config.hidden_act]

    has_bias = experts_bias_flag("mlp_bias")  # transformers' kernels read it too

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """`[N, d]` tokens, `[N, K]` experts and gates -> `[N, d]`. Without autograd and with at most one choice per
        expert (decoding), two unsorted `embedding_bag`s (`bag_mixture`) compute it; else the sorted dispatch."""
        if not self.has_bias and bag_mixture_wins(top_k_index, self.up_proj, hidden_states, top_k_weights):
            # expert parallelism gives other ranks' experts the id `num_experts` and gate 0: any expert computes 0
            top_k_index = top_k_index.clamp(max=self.num_experts - 1)
            n, k = top_k_index.shape
            rows = hidden_states.repeat_interleave(k, dim=0).unsqueeze(1)  # [N * K, 1, d]: one row per choice
            hidden = self.act_fn(bag_mixture(rows, top_k_index.reshape(-1, 1), self.up_proj))  # [N * K, e]
            return bag_mixture(hidden.view(n, k, -1), top_k_index, self.down_proj, top_k_weights)
        plan = plan_dispatch(top_k_index, self.num_experts)
        biases = (self.up_proj_bias, self.down_proj_bias) if self.has_bias else (None, None)
        return expert_mlp(hidden_states, plan, self.up_proj, self.down_proj, self.act_fn, top_k_weights, *biases)


class MoEUTFeedForward(nn.Module):
    """sigma-MoE: y = sum over the K chosen experts of sigmoid(router score) * expert(x)."""

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.router = MoEUTRouter(
            config.hidden_size, 1, config.num_experts, config.num_experts_per_tok, config.expert_dropout
        )
        self.experts = MoEUTExperts(config)

    def forward(self, hidden_states: torch.Tensor, router_input: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        _, gates, selected = self.router(router_input.reshape(-1, shape[-1]))
        out = self.experts(hidden_states.reshape(-1, shape[-1]), selected, gates.to(hidden_states.dtype))
        return out.view(shape)


class MoEUTAttention(nn.Module):
    """SwitchHead attention, shared across the repeats of its layer (the cache slot is passed at call time).

    With `num_attention_experts > 1`, head h's value is the gated sum of its top-k value experts applied to the
    value input, and the output is the gated sum over heads and their top-k output experts of the attention result;
    expert e of head h is expert `h * num_attention_experts + e` of the banks `v_experts` `[H * E, d, dh]` and
    `o_experts` `[H * E, dh, d]`. With one expert, V and O are dense and each head's output is scaled by a sigmoid
    gate read from the query input.
    """

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.config = config
        d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.num_heads = heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5  # the official dh^-1/4 on q and on k
        self.is_causal = True
        self.num_key_value_groups = 1
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d, heads * head_dim, bias=bias)
        self.num_experts = config.num_attention_experts
        if self.num_experts > 1:
            router_args = (d, heads, self.num_experts, config.num_attention_experts_per_tok)
            self.v_router = MoEUTRouter(*router_args, config.attention_expert_dropout, renorm_rows=True)
            self.o_router = MoEUTRouter(*router_args, config.attention_expert_dropout, renorm_rows=True)
            self.v_experts = nn.Parameter(torch.empty(heads * self.num_experts, d, head_dim))
            self.o_experts = nn.Parameter(torch.empty(heads * self.num_experts, head_dim, d))
            self.v_bias = nn.Parameter(torch.zeros(heads * self.num_experts, head_dim)) if bias else None
            self.o_bias = nn.Parameter(torch.zeros(d)) if bias else None
        else:
            self.v_proj = nn.Linear(d, heads * head_dim, bias=bias)
            self.o_proj = nn.Linear(heads * head_dim, d, bias=bias)
            self.o_gate = nn.Parameter(torch.empty(heads, d))  # official `sel_o`

    @property
    def output_bias(self) -> torch.Tensor | None:
        """The bias added to the sum over heads (tensor parallelism adds it once, after the ranks' sum)."""
        return self.o_bias if self.num_experts > 1 else self.o_proj.bias

    def _values(self, value_input: torch.Tensor, router_input: torch.Tensor, heads: int) -> torch.Tensor:
        """`[N, d]` -> `[N, heads, dh]` (`heads`: all, or this rank's under tensor parallelism)."""
        if self.num_experts == 1:
            return self.v_proj(value_input).view(-1, heads, self.head_dim)
        _, gates, selected = self.v_router(router_input)
        if self.v_bias is None and bag_mixture_wins(selected, self.v_experts, value_input, gates):  # decoding
            rows, k = value_input.shape[0] * heads, self.v_router.num_selected
            value_rows = value_input.repeat_interleave(heads, dim=0).unsqueeze(1)  # [N * heads, 1, d]
            values = bag_mixture(value_rows, selected.view(rows, k), self.v_experts, gates.view(rows, k))
            return values.view(-1, heads, self.head_dim)
        plan = plan_dispatch(selected, self.v_experts.shape[0])
        per_head = replace(plan, token_index=plan.flat_index // self.v_router.num_selected)  # rows (token, head)
        values = gathered_linear(value_input, self.v_experts, plan, bias=self.v_bias)  # [S, dh]
        values = scatter_rows(values, per_head, value_input.shape[0] * heads, gates.to(values.dtype))
        return values.view(-1, heads, self.head_dim)

    def _output(self, attn_output: torch.Tensor, router_input: torch.Tensor) -> torch.Tensor:
        """`[N, heads, dh]` attention result -> `[N, d]`."""
        if self.num_experts == 1:
            gate = torch.sigmoid(F.linear(router_input, self.o_gate))[..., None]
            return self.o_proj((attn_output * gate).flatten(1))
        _, gates, selected = self.o_router(router_input)
        if bag_mixture_wins(selected, self.o_experts, attn_output, gates):  # decoding: per token, one bag
            head_rows = attn_output.repeat_interleave(self.o_router.num_selected, dim=1)  # [N, H * k, dh]
            output = bag_mixture(head_rows, selected, self.o_experts, gates)
            return output if self.o_bias is None else output + self.o_bias
        plan = plan_dispatch(selected, self.o_experts.shape[0])
        per_head = replace(plan, token_index=plan.flat_index // self.o_router.num_selected)  # rows (token, head)
        rows = gather_rows(attn_output.reshape(-1, self.head_dim), per_head)  # [S, dh]
        rows = rows * sorted_gates(gates, plan).to(rows.dtype)
        output = scatter_rows(grouped_linear(rows, self.o_experts, plan), plan, attn_output.shape[0])
        return output if self.o_bias is None else output + self.o_bias

    def forward(
        self,
        query_input: torch.Tensor,
        value_input: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        cache_idx: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, d = query_input.shape
        flat_query_input = query_input.reshape(-1, d)
        query = self.q_proj(query_input).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [B, H, T, dh]
        heads = query.shape[1]  # num_heads, or this rank's share under tensor parallelism
        key = self.k_proj(query_input).view(batch, seq, heads, self.head_dim).transpose(1, 2)
        value = self._values(value_input.reshape(-1, d), flat_query_input, heads)
        value = value.view(batch, seq, heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_partial_rotary(query, cos, sin), apply_partial_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, cache_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs
        )  # [B, T, H, dh]
        output = self._output(attn_output.reshape(-1, heads, self.head_dim), flat_query_input)
        return output.view(batch, seq, d), attn_weights


class MoEUTDecoderLayer(GradientCheckpointingLayer):
    """SwitchHead attention then sigma-MoE, with LayerNorms placed by `config.norm_scheme`; shared across repeats."""

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.norm_scheme = config.norm_scheme
        self.attention = MoEUTAttention(config)
        self.mlp = MoEUTFeedForward(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.attention_output_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        cache_idx: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention_args = (position_embeddings, attention_mask, cache, cache_idx)
        if self.norm_scheme == "post":
            attn_output, _ = self.attention(hidden_states, hidden_states, *attention_args, **kwargs)
            hidden_states = self.input_layernorm(hidden_states + self.dropout(attn_output))
            return self.post_attention_layernorm(hidden_states + self.mlp(hidden_states, hidden_states))

        normed = self.input_layernorm(hidden_states)
        value_input = hidden_states if self.norm_scheme == "peri" else normed
        attn_output, _ = self.attention(normed, value_input, *attention_args, **kwargs)
        hidden_states = hidden_states + self.dropout(attn_output)
        normed = self.post_attention_layernorm(hidden_states)
        expert_input = hidden_states if self.norm_scheme == "peri" else normed
        return hidden_states + self.mlp(expert_input, normed)


class MoEUTPreTrainedModel(CheckedConfigMixin, RemoteCodeMixin, EagerExpertsMixin, PreTrainedModel):
    config_class = MoEUTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEUTDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": MoEUTDecoderLayer,
        "attentions": OutputRecorder(MoEUTAttention, index=1),
        "router_logits": OutputRecorder(MoEUTRouter, index=0),
    }
    _remote_code_classes = {
        "AutoModel": "MoEUTModel",
        "AutoModelForCausalLM": "MoEUTForCausalLM",
        "AutoModelForSequenceClassification": "MoEUTForSequenceClassification",
        "AutoModelForTokenClassification": "MoEUTForTokenClassification",
        "AutoModelForQuestionAnswering": "MoEUTForQuestionAnswering",
    }

    @property
    def router_losses_with_labels(self) -> bool:
        """In training with labels, the regulariser joins the loss unasked when it has a positive weight (the
        official model always adds it in training)."""
        return self.config.router_aux_loss_coef > 0 or self.config.attention_router_aux_loss_coef > 0

    def router_losses(self, router_logits, batch_size, attention_mask):
        """The entropy regulariser (`moeut_aux_loss`), already weighted by its two coefficients: it is returned as
        `aux_loss` and added to the loss as it is (the official `loss + reg_loss`; nothing when both weights are 0)."""
        aux_loss = moeut_aux_loss(self.config, router_logits, batch_size, attention_mask)
        return aux_loss, aux_loss if self.router_losses_with_labels else None

    @torch.no_grad()
    def _init_weights(self, module):
        """The official initialisation: std `initializer_range / sqrt(fan_in)` (initializer_range defaults to
        sqrt(2 / num_hidden_layers)), where the fan-in of an expert bank's output side is the whole bank's (the FFN
        down-projections: num_experts * moe_intermediate_size; SwitchHead's output experts: heads * head_dim), router
        rows renormalised, embedding std 1/sqrt(d), PyTorch's default for the output heads (LM, classifier, answer
        span).

        Each parameter is initialised by the module that owns it directly: transformers skips custom-code modules
        without direct parameters.
        """
        super()._init_weights(module)
        scale = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if any(module is getattr(self, head, None) for head in ("lm_head", "score", "qa_outputs")):
                bound = module.weight.shape[1] ** -0.5  # nn.Linear's default: kaiming_uniform(a=sqrt(5)), U(+-bound)
                init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    init.uniform_(module.bias, -bound, bound)
            else:  # q, k (and dense v, o): fan_in is d for q, k, v and heads * head_dim for o
                init.normal_(module.weight, mean=0.0, std=scale / module.weight.shape[1] ** 0.5)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=module.weight.shape[1] ** -0.5)
        elif isinstance(module, MoEUTRouter):
            _init_router(module.weight, scale, per_row=module.renorm_rows)
        elif isinstance(module, MoEUTExperts):
            num_experts, d, width = module.up_proj.shape
            init.normal_(module.up_proj, mean=0.0, std=scale / d**0.5)
            init.normal_(module.down_proj, mean=0.0, std=scale / (num_experts * width) ** 0.5)
            if module.has_bias:
                init.zeros_(module.up_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, MoEUTAttention):
            if module.num_experts > 1:
                init.normal_(module.v_experts, mean=0.0, std=scale / module.v_experts.shape[1] ** 0.5)
                init.normal_(module.o_experts, mean=0.0, std=scale / (module.num_heads * module.head_dim) ** 0.5)
                if module.v_bias is not None:
                    init.zeros_(module.v_bias)
                    init.zeros_(module.o_bias)
            else:
                _init_router(module.o_gate, scale, per_row=True)


def _init_router(weight: torch.Tensor, scale: float, per_row: bool):
    """Router rows `[choices, d]` ~ N(0, scale / sqrt(d)), then scaled to unit norm and back to the overall std
    (official `renorm_keep_std(dim=1)`); with `per_row`, back to each row's own std (SwitchHead's `renorm_rows`)."""
    init.normal_(weight, mean=0.0, std=scale / weight.shape[1] ** 0.5)
    std = weight.std(dim=-1, keepdim=True) if per_row else weight.std()
    tiny = torch.finfo(weight.dtype).tiny  # guards the divisions against an all-zero row
    normed = weight / weight.norm(dim=-1, keepdim=True).clamp(min=tiny)
    init.copy_(weight, normed * (std / normed.std().clamp(min=tiny)))


class MoEUTModel(MoEUTPreTrainedModel):
    def __init__(self, config: MoEUTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.rotary_emb = MoEUTRotaryEmbedding(config)
        self.layers = nn.ModuleList(MoEUTDecoderLayer(config) for _ in range(config.num_unique_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
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
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # one slot per unrolled step
        if position_ids is None:
            position_ids = position_ids_from_mask(inputs_embeds, attention_mask, cache)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_FIELD: cache},  # the argument's name in the installed transformers
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        if self.config.position_embedding_type == "learned_absolute":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        for step in range(self.config.num_hidden_layers):
            hidden_states = self.layers[step % self.config.num_unique_layers](
                hidden_states,
                position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                cache_idx=step,
                **kwargs,
            )
        last_hidden_state = self.norm(hidden_states)
        return with_cache(MoeModelOutputWithPast, cache if use_cache else None, last_hidden_state=last_hidden_state)


def moeut_aux_loss(config: MoEUTConfig, router_logits, batch_size: int, attention_mask) -> torch.Tensor:
    """The paper's regulariser: for each shared layer, the entropy loss of its FFN router (times
    `router_aux_loss_coef`) and of its V and O routers (times `attention_router_aux_loss_coef`), each pooled over
    positions and over all repeats of the layer; summed over layers (not averaged), as in the official code.

    `router_logits` (not empty) is in call order: per unrolled step, [V router, O router,] FFN router.
    """
    per_step = 3 if config.num_attention_experts > 1 else 1
    coefs = [config.attention_router_aux_loss_coef] * (per_step - 1) + [config.router_aux_loss_coef]
    calls_per_layer = per_step * config.num_unique_layers
    loss = 0.0
    for first_call in range(calls_per_layer):
        calls = router_logits[first_call::calls_per_layer]
        loss = loss + coefs[first_call % per_step] * sequence_entropy_loss(calls, batch_size, attention_mask)
    return loss


class MoEUTForCausalLM(CausalLMWithRouterLosses, MoEUTPreTrainedModel, GenerationMixin):
    """MoEUT with its language-model head: by default untied and biased, as in the official code
    (`tie_word_embeddings`, `lm_head_bias`; a GPT-2-seeded model takes GPT-2's tied head without bias).

    With `output_router_logits`, `router_logits` holds, per unrolled step, the [V router's, O router's,] FFN
    router's logits, and `aux_loss` the entropy regulariser (see `router_losses`).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoEUTConfig):
        super().__init__(config)
        self.model = MoEUTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()


class MoEUTForSequenceClassification(SequenceClassifierWithRouterLosses, MoEUTPreTrainedModel):
    """MoEUT with a linear head on the last non-padding token (GLUE-style classification and regression)."""

    base_model_class = MoEUTModel


class MoEUTForTokenClassification(TokenClassifierWithRouterLosses, MoEUTPreTrainedModel):
    """MoEUT with a linear head on every token (e.g. named entities), after `classifier_dropout(config)`."""

    base_model_class = MoEUTModel


class MoEUTForQuestionAnswering(QuestionAnsweringWithRouterLosses, MoEUTPreTrainedModel):
    """MoEUT with a linear head giving each token an answer-start and an answer-end logit (extractive QA)."""

    base_model_class = MoEUTModel


__all__ = [
    "MoEUTPreTrainedModel", "MoEUTModel", "MoEUTForCausalLM", "MoEUTForSequenceClassification",
    "MoEUTForTokenClassification", "MoEUTForQuestionAnswering",
]  # fmt: skip
