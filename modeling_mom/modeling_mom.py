"""Mixture-of-Modules (MoM): Gong et al., "Mixture-of-Modules: Reinventing Transformers as Dynamic Assemblies of
Modules", EMNLP 2024 (arXiv 2407.06677), on transformers 5.x.

A token's path, from `input_ids` to logits:

    embed_tokens(ids) + embed_positions(pos)
    for each unrolled step (a plain GPT-2 block, or one round of a chunk):
        attention router (chunks, pools with a choice) picks K of the attention modules (or SKIP) per token
        x = x + assembled attention: per-token Q/K/V summed over the token's modules, one causal attention
            over the sequence, output = gate-weighted sum of the modules' output projections
        FFN router picks K FFN modules (or SKIP) per token
        x = x + gate-weighted sum of the picked FFN modules
    norm -> lm_head (tied to embed_tokens when `tie_word_embeddings`, GPT-2's default)

Every module owns its pre-LayerNorm; residuals stay outside the modules, so a chunk run in "sequential" routing
mode (round h = module h, weight 1) is exactly a stack of GPT-2 blocks (in training up to dropout: as in the
authors' code, a chunk's FFN outputs skip `resid_dropout`). Each unrolled step has its own KV-cache
slot (`config.num_hidden_layers` of them), which keeps cached decoding exact for any number of rounds.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward  # GPT-2's: softmax in the input dtype
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import maybe_autocast, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mom import MoMConfig
from .moe_dispatch import DispatchPlan, expert_mlp, gather_rows, grouped_linear, plan_dispatch, scatter_rows
from .moe_tensor_parallel import is_sharded
from .routing_losses import at_least_float32, switch_load_balancing_loss
from .shared_modeling import (
    CACHE_FIELD,
    CausalLMWithRouterLosses,
    CheckedConfigMixin,
    LearnedPositionEmbedding,
    QuestionAnsweringWithRouterLosses,
    RemoteCodeMixin,
    SequenceClassifierWithRouterLosses,
    TokenClassifierWithRouterLosses,
    accepts_past_key_values,
    position_ids_from_mask,
    with_cache,
)


@dataclass
class ModuleRoute:
    """The modules each token uses in one pool for one round.

    Either `module` (the index of the one module every token uses, with weight exactly 1 (plain blocks and sequential
    routing) or with `[T, 1]` `weights`), with `module_parameters` (the pool's per-module views of this forward, see
    `MoMModulePool.module_parameters`) if the model unbound them, or `plan` + `weights` (learned routing: the
    dispatch plan of the `[T, K]` selections and their `[T, K]` weights). `qkv_weights`: the attention modules' Q, K,
    V weights (`config.weighted_qkv`; unweighted if None).
    """

    module: int | None = None
    module_parameters: list[dict[str, torch.Tensor]] | None = None
    plan: DispatchPlan | None = None
    weights: torch.Tensor | None = None
    qkv_weights: torch.Tensor | None = None

    def collapsed(self) -> "ModuleRoute":
        """Without autograd, a learned route on which every token picked the same single module (K=1: always so in
        batch-1 decoding) as that module's plain layer, weighted per token. Same values, without the dispatch's
        gathers, grouped matmuls and scatter: on a 2-core CPU they cost ~0.5 ms per pool and round, a quarter of a
        GPT-2-small layer's decoding step. (With autograd, indexing the module would give the backward a pool-sized
        gradient; under autocast the dispatch adds biases in fp32, the plain layer in the autocast dtype; compiled code
        skips the test, which torch.compile could only guard on per row count.)"""
        device = self.weights.device.type
        if torch.is_grad_enabled() or torch.is_autocast_enabled(device) or torch.compiler.is_compiling():
            return self
        used = [e for e, count in enumerate(self.plan.counts) if count]
        num_tokens, k = self.weights.shape
        if k != 1 or len(used) != 1 or self.plan.counts[used[0]] != num_tokens:
            return self
        return ModuleRoute(module=used[0], weights=self.weights, qkv_weights=self.qkv_weights)


class MoMPoolNorm(nn.Module):
    """The pre-LayerNorms of a pool's modules: gains and biases `[N, d]`, module n's at row n (GPT-2's `ln_1` or
    `ln_2`). Named `norm.weight` / `norm.bias` like an `nn.LayerNorm`, so that the Trainer leaves them out of weight
    decay, as it does GPT-2's."""

    def __init__(self, num_modules: int, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modules, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_modules, hidden_size))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gains and biases, read through a call: hooks that hold the weights only during a module's own call
        (accelerate's offloading) load them for it."""
        return self.weight, self.bias


class MoMModulePool(nn.Module):
    """Parameters shared by both pool types: each module's own pre-LayerNorm (`norm`, `[N, d]` gains and biases).

    `pool_tensors` returns the stacked tensors (`[N, ...]`, module n at index n): the LayerNorm's, then the pool
    type's `projection_names`, read as attributes so that a parametrization of one (e.g. a LoRA delta that peft's
    `target_parameters` applies) is seen.
    """

    projection_names: tuple[str, ...] = ()

    def __init__(self, config: MoMConfig, num_modules: int):
        super().__init__()
        self.num_modules = num_modules
        self.norm = MoMPoolNorm(num_modules, config.hidden_size, config.layer_norm_epsilon)

    def pool_tensors(self) -> dict[str, torch.Tensor]:
        """`{name: [N, ...] tensor}`, as the module's attributes read them now (a parametrized tensor is an attribute,
        not a parameter)."""
        norm_weight, norm_bias = self.norm()
        return {"norm.weight": norm_weight, "norm.bias": norm_bias} | {
            name: getattr(self, name) for name in self.projection_names
        }

    @property
    def weights_only_in_call(self) -> bool:
        """Whether the weights exist whole only during the pool's own call: off-loaded by accelerate (on `meta`) or
        sharded by FSDP (DTensors), and loaded or gathered for the call."""
        return any(p.is_meta or is_sharded(p) for p in self.parameters())

    def module_parameters(self) -> list[dict[str, torch.Tensor]]:
        """Each module's parameters, `{name: view}`, unbound from the pool's tensors at once.

        A forward unbinds every pool once and hands each round its module's views: indexing the pool in each round
        instead would give each round's backward a full pool-sized gradient, quadratic in the pool size (1.65x
        GPT-2's training time with 24 modules, against ~1x).
        """
        tensors = self.pool_tensors()
        return [dict(zip(tensors, views)) for views in zip(*(tensor.unbind(0) for tensor in tensors.values()))]

    def single_module(self, route: ModuleRoute) -> dict[str, torch.Tensor]:
        """The parameters of `route`'s one module: the views unbound for this forward, else indexed here (a pool
        wrapped by an adapter, offloaded or sharded, whose weights exist only inside this module's call)."""
        if route.module_parameters is not None:
            return route.module_parameters[route.module]
        return {name: tensor[route.module] for name, tensor in self.pool_tensors().items()}

    def norm_single(self, x: torch.Tensor, module: dict[str, torch.Tensor]) -> torch.Tensor:
        """One module's LayerNorm applied to all rows `[T, d]` (GPT-2's `ln_1` / `ln_2`)."""
        return F.layer_norm(x, x.shape[-1:], module["norm.weight"], module["norm.bias"], self.norm.eps)

    def norm_routed(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """`[T, d]` -> `[S, d]`: each sorted (token, module) pair normalised with that module's LayerNorm."""
        weight, bias = self.norm()
        normed = gather_rows(F.layer_norm(x, x.shape[-1:], eps=self.norm.eps), plan)
        return normed * weight.index_select(0, plan.expert_index) + bias.index_select(0, plan.expert_index)


class MoMAttention(MoMModulePool):
    """A pool of attention modules, each `out_proj(MHA(qkv_proj(LN(x))))` as in GPT-2, assembled per token.

    In a round, token t's query, key and value are the *sum* of the QKV projections of its selected modules
    (weighted by their router weights if `config.weighted_qkv`); one causal attention runs over the whole sequence
    (tokens that chose different modules still attend to each other), and token t's output is the gate-weighted sum
    of its modules' output projections of that attention output.
    A token that selected only SKIP has zero query, key and value, and zero output.
    """

    projection_names = ("qkv_proj", "qkv_bias", "out_proj", "out_bias")

    def __init__(self, config: MoMConfig, num_modules: int):
        super().__init__(config, num_modules)
        d = config.hidden_size
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = d // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.num_key_value_groups = 1
        self.qkv_proj = nn.Parameter(torch.empty(num_modules, d, 3 * d))  # [N, in, out]
        self.qkv_bias = nn.Parameter(torch.zeros(num_modules, 3 * d))
        self.out_proj = nn.Parameter(torch.empty(num_modules, d, d))
        self.out_bias = nn.Parameter(torch.zeros(num_modules, d))
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        route: ModuleRoute,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        cache_idx: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, d = hidden_states.shape
        x = hidden_states.reshape(-1, d)
        if route.module is not None:  # Conv1D layout: `x @ weight[in, out] + bias`
            m = self.single_module(route)
            qkv = torch.addmm(m["qkv_bias"], self.norm_single(x, m), m["qkv_proj"])
            qkv = qkv if route.qkv_weights is None else qkv * route.qkv_weights
        else:  # sum of the selected modules' projections, unweighted unless `weighted_qkv` (as in the authors' code)
            qkv_rows = grouped_linear(self.norm_routed(x, route.plan), self.qkv_proj, route.plan, self.qkv_bias)
            qkv = scatter_rows(qkv_rows, route.plan, x.shape[0], gates=route.qkv_weights)
        # [B, T, 3d] -> 3 x [B, heads, T, head_dim]
        query, key, value = qkv.view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            key, value = cache.update(key, value, cache_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(-1, d)
        if route.module is not None:
            out = torch.addmm(m["out_bias"], attn_output, m["out_proj"])
            out = out if route.weights is None else out * route.weights
        else:
            out_rows = grouped_linear(gather_rows(attn_output, route.plan), self.out_proj, route.plan, self.out_bias)
            out = scatter_rows(out_rows, route.plan, x.shape[0], gates=route.weights)
        return self.resid_dropout(out.view(batch, seq, d)), attn_weights


class MoMFeedForward(MoMModulePool):
    """A pool of GPT-2 MLP modules, `down(act(up(LN(x))))`; a token's output is the gate-weighted sum of its picks.

    `output_dropout` is GPT-2's `resid_pdrop` in plain blocks and 0 in chunks, as in the authors' code.
    """

    projection_names = ("up_proj", "up_bias", "down_proj", "down_bias")

    def __init__(self, config: MoMConfig, num_modules: int, output_dropout: float):
        super().__init__(config, num_modules)
        d, inner = config.hidden_size, config.intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_modules, d, inner))  # [N, in, out]
        self.up_bias = nn.Parameter(torch.zeros(num_modules, inner))
        self.down_proj = nn.Parameter(torch.empty(num_modules, inner, d))
        self.down_bias = nn.Parameter(torch.zeros(num_modules, d))
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(output_dropout)

    def forward(self, hidden_states: torch.Tensor, route: ModuleRoute) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if route.module is not None:
            m = self.single_module(route)
            h = self.act(torch.addmm(m["up_bias"], self.norm_single(x, m), m["up_proj"]))
            out = torch.addmm(m["down_bias"], h, m["down_proj"])
            out = out if route.weights is None else out * route.weights
        else:
            plan = route.plan
            biases = (self.up_bias, self.down_bias)
            rows = self.norm_routed(x, plan)
            out = expert_mlp(x, plan, self.up_proj, self.down_proj, self.act, route.weights, *biases, rows=rows)
        return self.dropout(out.view(shape))


class MoMRouter(nn.Module):
    """Scores one pool's choices (its modules, then SKIP if enabled) for every token from its residual stream.

    "mlp": `W2 relu(W1 x)`. "gru": a GRU cell stepped once per round (state reset at each chunk's first round),
    then a linear read-out, so a decision can depend on the token's earlier routing. Returns the logits divided by
    `router_temperature` (so `softmax` of them are the routing probabilities) and the new GRU state.

    Routers compute in their weights' dtype with autocast off, and `from_pretrained` keeps them in fp32 when the
    rest of the model loads in half precision (`_keep_in_fp32_modules_strict`): a top-K choice flips on small logit
    errors (the Switch Transformer's "selective precision"). They are created in fp32 whatever the default dtype, so
    a model built in half precision from its config has them in fp32 too.
    """

    def __init__(self, config: MoMConfig, num_choices: int):
        super().__init__()
        self.router_type = config.router_type
        self.temperature = config.router_temperature
        fp32 = {"dtype": torch.float32}
        if config.router_type == "gru":
            self.cell = nn.GRUCell(config.hidden_size, config.router_hidden_size, **fp32)
        else:
            self.fc = nn.Linear(config.hidden_size, config.router_hidden_size, **fp32)
        self.out = nn.Linear(config.router_hidden_size, num_choices, **fp32)

    def forward(
        self, hidden_states: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states = hidden_states.to(self.out.weight.dtype)
        with maybe_autocast(device_type=hidden_states.device.type, enabled=False):
            if self.router_type == "gru":
                state = self.cell(hidden_states, state)
                features = state
            else:
                features = F.relu(self.fc(hidden_states))
            return at_least_float32(self.out(features)) / self.temperature, state


class SignStraightThrough(torch.autograd.Function):
    """`sign(w)` forward; backward, the incoming gradient clipped to [-1, 1] (the authors' `use_ste`)."""

    @staticmethod
    def forward(ctx, weights):
        return torch.sign(weights)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-1, 1)


def route_tokens(router_logits: torch.Tensor, config: MoMConfig, num_modules: int, weigh_qkv: bool) -> ModuleRoute:
    """`[T, choices]` logits -> each token's modules and their weights (see `MoMConfig.router_weighting`,
    `routing_mode` and `sign_router_weights`), and with `weigh_qkv` the same weights for Q, K and V."""
    weighting = config.router_weighting
    scores = router_logits if weighting == "score" else F.softmax(router_logits, dim=-1)
    if config.routing_mode == "all_modules":  # every module, weighted by its probability (or score) among all choices
        weights = scores[:, :num_modules]
        selected = torch.arange(num_modules, device=weights.device).expand(weights.shape)
    else:  # the authors' top-min(K, choices); for "score" the same choices as the probabilities' (softmax is monotonic)
        weights, selected = scores.topk(min(config.num_modules_per_tok, scores.shape[-1]), dim=-1)
    if weighting in ("renormalize", "straight_through"):
        top_probs, weights = weights, weights / weights.sum(-1, keepdim=True)
        if weighting == "straight_through":  # forward value unchanged (p - p is exactly 0), gradient of p
            weights = weights.detach() + (top_probs - top_probs.detach())
    qkv_weights = weights if weigh_qkv else None
    if config.sign_router_weights:  # one estimator per use, each clipping its own gradient, as in the authors' code
        weights = SignStraightThrough.apply(weights)
        qkv_weights = None if qkv_weights is None else SignStraightThrough.apply(qkv_weights)
    return ModuleRoute(plan=plan_dispatch(selected, num_modules), weights=weights, qkv_weights=qkv_weights)


def pool_choices(config: MoMConfig, num_modules: int) -> int:
    """A chunk pool's routing choices: its modules, and SKIP if enabled. A pool with one choice has no router."""
    return num_modules + int(config.enable_skip)


def pool_router(config: MoMConfig, num_modules: int) -> MoMRouter | None:
    num_choices = pool_choices(config, num_modules)
    return MoMRouter(config, num_choices) if num_choices > 1 else None


class MoMDecoderLayer(GradientCheckpointingLayer):
    """An attention pool and an FFN pool, with their routers if the layer is a chunk; called once per round.

    A plain GPT-2 block (bottom, anchor, top) is the special case of one module per pool, one round, no router. A
    chunk's pool with a single choice (one module and no SKIP) has no router either, as in the authors' code: every
    token uses its module in every round (the Universal-Transformer-like sharing case). With SKIP, a one-module pool
    routes between its module and SKIP (layer skipping).
    """

    def __init__(self, config: MoMConfig, routed: bool):
        super().__init__()
        num_attention = config.num_attention_modules if routed else 1
        num_ffn = config.num_ffn_modules if routed else 1
        self.config = config
        self.pool_sizes = (num_attention, num_ffn)
        self.attention = MoMAttention(config, num_attention)
        self.mlp = MoMFeedForward(config, num_ffn, output_dropout=0.0 if routed else config.resid_dropout)
        self.attention_router = pool_router(config, num_attention) if routed else None
        self.mlp_router = pool_router(config, num_ffn) if routed else None

    def _router(self, pool: int) -> MoMRouter | None:
        """The router that runs for pool 0 (attention) or 1 (FFN), if any."""
        router = (self.attention_router, self.mlp_router)[pool]
        return router if self.config.routing_mode != "sequential" else None

    def module_parameters(self) -> tuple[list | None, list | None]:
        """Per pool, its per-module parameters (`MoMModulePool.module_parameters`) where each round uses one module
        for every token (plain blocks, single-choice pools, sequential routing), for the model to unbind once per
        forward and pass to every round; else None. A pool wrapped by an adapter (peft's `ParamWrapper` changes the
        weights only inside the pool's own call), offloaded (accelerate loads its weights only for that call) or
        sharded (FSDP gathers them only for the decoder layer's call) gets None: it indexes its module in each round
        instead."""
        pools = (self.attention, self.mlp)
        return tuple(
            pools[i].module_parameters()
            if isinstance(pools[i], MoMModulePool) and not pools[i].weights_only_in_call and self._router(i) is None
            else None
            for i in range(2)
        )

    def _route(self, pool: int, hidden_states, round_idx, state, modules):
        router = self._router(pool)
        if router is None:  # module h in round h (sequential routing), or the pool's only module
            return ModuleRoute(module=round_idx if self.pool_sizes[pool] > 1 else 0, module_parameters=modules), state
        logits, state = router(hidden_states.reshape(-1, hidden_states.shape[-1]), state)
        num_modules = logits.shape[-1] - int(self.config.enable_skip)
        route = route_tokens(logits, self.config, num_modules, weigh_qkv=pool == 0 and self.config.weighted_qkv)
        route.weights = route.weights.to(hidden_states.dtype)
        route.qkv_weights = None if route.qkv_weights is None else route.qkv_weights.to(hidden_states.dtype)
        return route.collapsed(), state

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_router_state: torch.Tensor | None = None,
        mlp_router_state: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        round_idx: int = 0,
        cache: Cache | None = None,
        cache_idx: int = 0,
        module_parameters: tuple[list, list] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One round. `module_parameters`: this layer's `module_parameters()`, unbound once per model forward (if
        not given, each pool indexes its module, which is correct but costs a pool-sized gradient per round)."""
        attention_modules, mlp_modules = module_parameters or (None, None)
        route, attention_router_state = self._route(
            0, hidden_states, round_idx, attention_router_state, attention_modules
        )
        attn_output, _ = self.attention(hidden_states, route, attention_mask, cache, cache_idx, **kwargs)
        hidden_states = hidden_states + attn_output
        route, mlp_router_state = self._route(1, hidden_states, round_idx, mlp_router_state, mlp_modules)
        hidden_states = hidden_states + self.mlp(hidden_states, route)
        return hidden_states, attention_router_state, mlp_router_state


class MoMPreTrainedModel(CheckedConfigMixin, RemoteCodeMixin, PreTrainedModel):
    config_class = MoMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoMDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["attention_router", "mlp_router"]
    _can_record_outputs = {
        "hidden_states": MoMDecoderLayer,
        "attentions": OutputRecorder(MoMAttention, index=1),
        "router_logits": OutputRecorder(MoMRouter, index=0),
    }
    _remote_code_classes = {
        "AutoModel": "MoMModel",
        "AutoModelForCausalLM": "MoMForCausalLM",
        "AutoModelForSequenceClassification": "MoMForSequenceClassification",
        "AutoModelForTokenClassification": "MoMForTokenClassification",
        "AutoModelForQuestionAnswering": "MoMForQuestionAnswering",
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2's initialisation; output projections scaled by 1/sqrt(2 * unrolled depth) as GPT-2 does per layer."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoMPoolNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, MoMAttention):
            init.normal_(module.qkv_proj, mean=0.0, std=std)
            init.zeros_(module.qkv_bias)
            init.normal_(module.out_proj, mean=0.0, std=std / (2 * self.config.num_hidden_layers) ** 0.5)
            init.zeros_(module.out_bias)
        elif isinstance(module, MoMFeedForward):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.zeros_(module.up_bias)
            init.normal_(module.down_proj, mean=0.0, std=std / (2 * self.config.num_hidden_layers) ** 0.5)
            init.zeros_(module.down_bias)
        elif isinstance(module, nn.GRUCell):
            for weight in (module.weight_ih, module.weight_hh):
                init.normal_(weight, mean=0.0, std=std)
            for bias in (module.bias_ih, module.bias_hh):
                init.zeros_(bias)

    @property
    def router_losses_with_labels(self) -> bool:
        """In training with labels, the balancing loss joins the loss unasked when it has a positive weight (the
        authors' model adds it inside `forward`)."""
        return self.config.router_aux_loss_coef > 0

    def router_losses(self, router_logits, batch_size, attention_mask):
        """Switch-style balancing loss of the attention routers plus that of the FFN routers (`router_logits` holds,
        per routed round, each routed pool's logits: attention then FFN), pooled over all rounds or averaged over
        per-round losses (`router_aux_loss_per_round`); the loss term is it times `router_aux_loss_coef` (None at
        0)."""
        config = self.config
        routed_pools = sum(pool_choices(config, n) > 1 for n in (config.num_attention_modules, config.num_ffn_modules))
        if config.router_aux_loss_per_round:  # one loss per round, averaged (the authors' depthwise_bal_loss)
            rounds = [router_logits[i : i + routed_pools] for i in range(0, len(router_logits), routed_pools)]
        else:
            rounds = [router_logits]
        aux_loss = 0.0
        for calls in rounds:
            for pool in range(routed_pools):
                pool_logits = calls[pool::routed_pools]
                k = min(config.num_modules_per_tok, pool_logits[0].shape[-1])  # as routed: top-min(K, choices)
                aux_loss = aux_loss + switch_load_balancing_loss(pool_logits, k, attention_mask)
        aux_loss = aux_loss / len(rounds)
        coef = config.router_aux_loss_coef
        return aux_loss, coef * aux_loss if coef else None


def layer_schedule(config: MoMConfig) -> tuple[list[bool], list[tuple[int, int]]]:
    """The layer stack (True = routed chunk) and the unrolled steps `(layer index, round)`, one per cache slot."""
    routed = [False] * config.num_bottom_layers
    for _ in range(config.num_chunks):
        routed += [True] + [False] * int(config.use_anchor_layers)
    routed += [False] * config.num_top_layers
    steps = [(i, r) for i, is_chunk in enumerate(routed) for r in range(config.num_rounds if is_chunk else 1)]
    return routed, steps


class MoMModel(MoMPreTrainedModel):
    def __init__(self, config: MoMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.embd_dropout)
        routed, self.steps = layer_schedule(config)
        self.layers = nn.ModuleList(MoMDecoderLayer(config, is_chunk) for is_chunk in routed)
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
        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))
        router_states = (None, None)
        for cache_idx, (layer_idx, round_idx) in enumerate(self.steps):
            layer = self.layers[layer_idx]
            if round_idx == 0:  # GRU router states restart at every chunk
                router_states = (None, None)
                module_parameters = layer.module_parameters()  # unbound once for all of this chunk's rounds
            hidden_states, *router_states = layer(
                hidden_states,
                *router_states,
                attention_mask=causal_mask,
                round_idx=round_idx,
                cache=cache,
                cache_idx=cache_idx,
                module_parameters=module_parameters,
                **kwargs,
            )
        last_hidden_state = self.norm(hidden_states)
        return with_cache(MoeModelOutputWithPast, cache if use_cache else None, last_hidden_state=last_hidden_state)


class MoMForCausalLM(CausalLMWithRouterLosses, MoMPreTrainedModel, GenerationMixin):
    """MoM with GPT-2's language-model head: tied to the input embeddings when `tie_word_embeddings` (the default).

    With `output_router_logits`, `router_logits` holds, per routed round, the attention router's then the FFN
    router's `[B * T, modules (+ SKIP)]` logits (of the pools that have a router), and `aux_loss` their Switch-style
    balancing loss, which is added to the loss times `config.router_aux_loss_coef` in training with labels, asked
    or not.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoMConfig):
        super().__init__(config)
        self.model = MoMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class MoMForSequenceClassification(SequenceClassifierWithRouterLosses, MoMPreTrainedModel):
    """MoM with a linear head on the last non-padding token (GLUE-style classification and regression)."""

    base_model_class = MoMModel


class MoMForTokenClassification(TokenClassifierWithRouterLosses, MoMPreTrainedModel):
    """MoM with a linear head on every token (e.g. named entities), after `classifier_dropout(config)`."""

    base_model_class = MoMModel


class MoMForQuestionAnswering(QuestionAnsweringWithRouterLosses, MoMPreTrainedModel):
    """MoM with a linear head giving each token an answer-start and an answer-end logit (extractive QA)."""

    base_model_class = MoMModel


__all__ = [
    "MoMPreTrainedModel", "MoMModel", "MoMForCausalLM", "MoMForSequenceClassification",
    "MoMForTokenClassification", "MoMForQuestionAnswering",
]  # fmt: skip
