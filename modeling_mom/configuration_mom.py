"""Configuration of Mixture-of-Modules (MoM; Gong et al., 2024, arXiv 2407.06677)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .config_checks import (
    ValidatedConfigMixin,
    check_choices,
    check_common,
    check_derived_set,
    check_dropouts,
    check_finite_positive,
    check_non_negative,
    check_positive,
    require,
)

ROUTER_TYPES = ("mlp", "gru")
ROUTER_WEIGHTINGS = ("renormalize", "probability", "straight_through", "score")
ROUTING_MODES = ("learned", "sequential", "all_modules")


@strict
class MoMConfig(ValidatedConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a Mixture-of-Modules causal language model.

    The layer stack is ``num_bottom_layers`` plain GPT-2 blocks, then ``num_chunks`` chunks (each followed by a
    plain "anchor" block when ``use_anchor_layers``), then ``num_top_layers`` plain blocks. A chunk holds a pool of
    ``num_attention_modules`` attention modules and ``num_ffn_modules`` feed-forward modules, each pool with a router
    if it offers a choice (more than one module, or SKIP); for
    ``num_rounds`` rounds each token picks ``num_modules_per_tok`` modules of each pool (or SKIP), and the picked
    modules are assembled into that round's attention and feed-forward sub-layer.

    Names in the authors' code (``gzhch/Mixture-of-Modules``): ``num_chunks`` = ``chunks``, ``num_attention_modules``
    / ``num_ffn_modules`` = ``num_attn`` / ``num_ffn``, ``num_rounds`` = ``depth_per_chunk`` (the paper's H),
    ``num_modules_per_tok`` = ``routing_top_k`` (the paper's K), ``use_anchor_layers`` = ``require_anchor_layer``,
    ``enable_skip`` = ``enable_pause``, ``router_type`` "mlp" = "naive", ``router_hidden_size`` = ``router_dim``,
    ``router_temperature`` = ``router_softmax_temperature``, ``router_aux_loss_per_round`` =
    ``depthwise_bal_loss``, ``sign_router_weights`` = ``use_ste``, ``routing_mode="all_modules"`` =
    ``routing_all_possible_path``, ``weighted_qkv`` the same; their router types with "softmax" (``naive_softmax``,
    ``gru_softmax``) are ``router_weighting="renormalize"``, those without (``naive``, ``gru``) ``"score"``.

    Args:
        vocab_size, max_position_embeddings, hidden_size, num_attention_heads, intermediate_size, hidden_act,
        layer_norm_epsilon, initializer_range: as in GPT-2 (``intermediate_size`` defaults to ``4 * hidden_size``).
        embd_dropout, resid_dropout, attention_dropout: GPT-2's ``embd_pdrop``, ``resid_pdrop``, ``attn_pdrop``
            (as in the authors' code, ``resid_dropout`` acts on every attention output, and on the FFN outputs of
            plain blocks only).
        num_bottom_layers, num_top_layers: plain blocks below and above the chunks.
        num_chunks: number of routed chunks.
        num_attention_modules, num_ffn_modules: pool sizes of every chunk. A pool with a single choice (one module,
            no SKIP) has no router: every round uses its module, as in the authors' code (with both pools of one
            module, a chunk applies one shared layer ``num_rounds`` times).
        num_rounds: assembly rounds per chunk (H); each round is one attention and one FFN application.
        num_modules_per_tok: modules each token picks per pool and round (K), among the modules and SKIP; a pool
            with fewer choices picks all of them (top-min(K, choices), as the authors' code does).
        use_anchor_layers: put a plain block after every chunk.
        enable_skip: add SKIP to each router's choices; a token that picks it gets no module (zero contribution;
            for attention its query, key and value are zero in that round, as in the authors' code).
        router_type: "mlp" (Linear-ReLU-Linear on the residual stream) or "gru" (a GRU cell stepped once per round,
            its state reset at the start of each chunk, so a decision can depend on the token's routing history).
        router_hidden_size: width of the router's hidden layer or GRU state.
        router_temperature: routing probabilities are ``softmax(logits / router_temperature)``.
        router_weighting: how a picked module's output is weighted. "renormalize": the top-K probabilities divided
            by their sum (the authors' softmax routers; with K=1 the weight is exactly 1 and the LM loss gives the
            router no gradient). "probability": the raw top-K probabilities (Switch Transformer). "straight_through":
            renormalised weights in the forward pass, gradient of the raw probabilities in the backward pass, so a
            K=1 router learns from the LM loss while a seeded model keeps its function. "score": the router's top-K
            scores themselves, unnormalised and possibly negative (the authors' routers without softmax, `naive` and
            `gru`, the router type of their pre-training script); needs `router_temperature=1`, since their code
            applies the temperature inside the softmax only.
        sign_router_weights: weight each picked module by the sign of its weight (+1 or -1) instead, with the
            weight's gradient taken as the incoming gradient clipped to [-1, 1] (a straight-through estimator; the
            authors' ``use_ste`` ablation). Positive weights (every weighting but "score") then weight by exactly 1.
        weighted_qkv: also weight each picked attention module's query, key and value by its weight (the authors'
            ablation of the same name); by default they are summed unweighted and only the output is weighted.
        routing_mode: "learned" uses the routers; "sequential" makes round h of every chunk use module h of each
            pool (or its only module) for every token with weight exactly 1 (the vanilla Transformer; routers are
            kept but not run). "all_modules" makes every token use every module of each pool in every round, each
            weighted by its routing probability (or score) over the modules and SKIP, without top-K (the authors'
            dense ablation ``routing_all_possible_path``; needs ``router_weighting`` "probability" or "score", and
            ``num_modules_per_tok`` is unused).
        router_aux_loss_coef: weight of the Switch-style load-balancing loss, added to the loss in training with
            labels (as the authors' model does; 0 turns it off).
        router_aux_loss_per_round: False pools each pool type's router calls over all rounds of all chunks into one
            loss (attention's plus FFN's); True computes the loss of each round (its attention's plus its FFN's)
            and averages over the rounds (the authors' ``depthwise_bal_loss``).
        output_router_logits: the causal LM returns the routers' logits and the balancing loss (``aux_loss``); the
            classifier returns neither.
        num_hidden_layers: the unrolled depth (one per attention application, i.e. one KV-cache slot each);
            derived from the structure, and checked if given.
    """

    model_type = "mom"
    # not predictions: the cache (its field before and since transformers 5.24) and the router outputs
    keys_to_ignore_at_inference = ["past_key_values", "cache", "aux_loss", "router_logits"]
    _auto_class = "AutoConfig"

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    hidden_act: str = "gelu_new"
    layer_norm_epsilon: int | float = 1e-5
    initializer_range: int | float = 0.02
    embd_dropout: int | float = 0.0
    resid_dropout: int | float = 0.0
    attention_dropout: int | float = 0.0

    num_bottom_layers: int = 1
    num_top_layers: int = 1
    num_chunks: int = 2
    num_attention_modules: int = 4
    num_ffn_modules: int = 4
    num_rounds: int = 4
    num_modules_per_tok: int = 1
    use_anchor_layers: bool = True
    enable_skip: bool = True
    router_type: str = "mlp"
    router_hidden_size: int = 256
    router_temperature: int | float = 1.0
    router_weighting: str = "straight_through"
    sign_router_weights: bool = False
    weighted_qkv: bool = False
    routing_mode: str = "learned"
    router_aux_loss_coef: int | float = 0.01
    router_aux_loss_per_round: bool = False
    output_router_logits: bool = False

    num_hidden_layers: int | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    tie_word_embeddings: bool = True

    # tensor parallelism: the vocabulary (embedding and tied head) split over the ranks; module pools replicated
    base_model_tp_plan = {"embed_tokens": "embedding_rowwise"}

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_hidden_layers is None:
            self.num_hidden_layers = self.unrolled_depth
        self.validate_architecture()  # a ValueError here; `@strict` runs the check again, wrapped in its own error
        super().__post_init__(**kwargs)

    @property
    def unrolled_depth(self) -> int:
        """Attention applications per token: bottom + top + chunks * (rounds + anchor)."""
        per_chunk = self.num_rounds + int(self.use_anchor_layers)
        return self.num_bottom_layers + self.num_top_layers + self.num_chunks * per_chunk

    def validate_architecture(self):
        """Every field's allowed values (see `config_checks`)."""
        check_derived_set(self, ("intermediate_size", "num_hidden_layers"))
        check_positive(
            self,
            ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "router_hidden_size",
             "max_position_embeddings", "num_attention_modules", "num_ffn_modules", "num_rounds",
             "num_modules_per_tok"),
        )  # fmt: skip
        check_non_negative(self, ("num_bottom_layers", "num_top_layers", "num_chunks", "router_aux_loss_coef"))
        check_dropouts(self, ("embd_dropout", "resid_dropout", "attention_dropout"))
        check_choices(
            self, {"router_type": ROUTER_TYPES, "router_weighting": ROUTER_WEIGHTINGS, "routing_mode": ROUTING_MODES}
        )
        check_common(self, epsilon="layer_norm_epsilon")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}.",
        )
        check_finite_positive(self, ("router_temperature",))
        require(
            self.router_weighting != "score" or self.router_temperature == 1,
            f"router_temperature={self.router_temperature} with router_weighting='score': the weights are the "
            "router's raw scores, as in the authors' routers without softmax, which apply a temperature only inside "
            "their softmax; allowed: 1.0, or another weighting.",
        )
        require(
            self.routing_mode != "all_modules" or self.router_weighting in ("probability", "score"),
            f"router_weighting={self.router_weighting!r} with routing_mode='all_modules': every module is weighted by "
            "its routing probability over all choices (or its score), not by top-K weights, as in the authors' "
            "routing_all_possible_path; allowed: 'probability' (routers with softmax) or 'score' (without).",
        )
        pool_sizes = [n for n in (self.num_attention_modules, self.num_ffn_modules) if n > 1]
        most_choices = max(self.num_attention_modules, self.num_ffn_modules) + int(self.enable_skip)
        require(
            self.num_modules_per_tok <= most_choices,
            f"num_modules_per_tok={self.num_modules_per_tok} is more than any pool offers (num_attention_modules="
            f"{self.num_attention_modules}, num_ffn_modules={self.num_ffn_modules}, enable_skip={self.enable_skip}; "
            f"a smaller pool uses all its choices, as in the authors' code); allowed: 1..{most_choices}.",
        )
        require(
            self.routing_mode != "sequential" or self.num_rounds <= min(pool_sizes, default=self.num_rounds),
            f"routing_mode='sequential' runs module h in round h, so num_rounds={self.num_rounds} must be <= the "
            f"number of modules of each pool that has more than one (num_attention_modules="
            f"{self.num_attention_modules}, num_ffn_modules={self.num_ffn_modules}).",
        )
        require(
            self.unrolled_depth >= 1,
            f"the structure has no layers (num_bottom_layers={self.num_bottom_layers}, num_top_layers="
            f"{self.num_top_layers}, num_chunks={self.num_chunks}): at least one must be >= 1.",
        )
        require(
            self.num_hidden_layers == self.unrolled_depth,
            f"num_hidden_layers={self.num_hidden_layers} does not match the structure, whose unrolled depth is "
            f"num_bottom_layers + num_top_layers + num_chunks * (num_rounds + use_anchor_layers) = "
            f"{self.unrolled_depth}; leave num_hidden_layers unset to derive it (when changing the structure of a "
            f"saved config, pass num_hidden_layers={self.unrolled_depth} too).",
        )


__all__ = ["MoMConfig"]
