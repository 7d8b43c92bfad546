"""Configuration of ModuleFormer (Shen et al., 2023, arXiv 2306.04640; the released MoLM models)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .config_checks import (
    ValidatedConfigMixin,
    check_choices,
    check_common,
    check_derived_set,
    check_dropouts,
    check_non_negative,
    check_positive,
    derived_property,
    require,
)
from .moe_tensor_parallel import experts_ep_plan, experts_tp_plan

ATTENTION_FUNCTIONS = ("stickbreaking", "stickbreaking_2024", "softmax")
POSITION_EMBEDDING_TYPES = ("none", "learned")
ROUTER_TYPES = ("mlp", "linear")
AUX_LOSS_TYPES = ("mi", "switch")


@strict
class ModuleFormerConfig(ValidatedConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a ModuleFormer causal language model: every layer is a mixture of attention heads (MoA: each
    attention expert owns a query and an output projection, keys and values are shared) followed by a mixture of
    feed-forward experts, each with its own router.

    The official MoLM ``config.json`` keys are accepted as aliases (``n_embd``, ``n_layer``, ``n_head``,
    ``att_hidden``, ``ffd_hidden``, ``n_att_experts``, ``k_att``, ``n_mlp_experts``, ``k_mlp``, ``gating_size``,
    ``gate_type``, ``activation_function``, ``aux_loss_weight``, ``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``,
    ``moe_pdrop``, ``att_func``, ``n_positions``); the official training-only keys (``block_size``,
    ``history_length``, ``n_ctx``, ...) are kept as plain attributes and unused. The official stochastic top-k
    (``sample_topk``) is not implemented and must be 0, as in every released config.

    Args:
        vocab_size, hidden_size, num_hidden_layers, hidden_act, layer_norm_epsilon, initializer_range: usual meaning
            (MoLM: 50295, 1024, 24 or 48, "gelu_new").
        num_attention_heads: heads of each attention expert, and of the shared keys/values.
        attention_hidden_size: width of each attention expert's query (``num_attention_heads * head_dim``); defaults
            to ``hidden_size``. When it equals ``hidden_size`` and there is one head, keys and values are the
            normalised hidden states themselves (no projection), as in the official code and MoLM.
        intermediate_size: hidden width of each feed-forward expert (MoLM: 2048).
        num_attention_experts, num_attention_experts_per_tok: attention experts per layer and how many each token
            uses (MoLM: 16 and 2).
        num_experts, num_experts_per_tok: feed-forward experts per layer and how many each token uses (MoLM: 32, 2).
        router_type: "mlp" (``Linear(d, router_hidden_size)`` - GELU - dropout - ``Linear(., E, bias=False)``, the
            official default) or "linear" (``Linear(d, E, bias=False)``).
        router_hidden_size: hidden width of the "mlp" router (MoLM: 256).
        normalize_expert_gates: divide the top-k gates by their sum. The official code does not (False): each
            expert's output is weighted by its softmax probability over all experts.
        expert_bias: give every expert projection a bias (needed to seed experts from GPT-2).
        attention_function: "stickbreaking" (the official model: key j <= query i, no remainder),
            "stickbreaking_2024" (Tan et al., 2024: keys j < i, the remainder of the stick goes to token i) or
            "softmax" (causal softmax attention).
        position_embedding_type: "none" (the official model: order comes from stick-breaking alone) or "learned"
            (GPT-2's absolute positions, up to ``max_position_embeddings``).
        stick_breaking_chunk_size: query rows per block of the stick-breaking kernel (memory O(chunk * keys)).
        stick_breaking_recompute_weights: in training, recompute the stick-breaking weights in the backward pass
            instead of keeping them from the forward pass: attention memory O(T * head_dim) per layer instead of
            O(T * S), like eager attention's probabilities, at about 1.3x the attention's forward + backward time.
            Neither field applies on CUDA with Triton, whose fused kernel never stores the weights (O(T * head_dim)).
        embd_dropout, resid_dropout, router_dropout: official ``embd_pdrop``, ``resid_pdrop``, ``moe_pdrop``
            (``router_dropout`` acts on the "mlp" router's hidden layer; the "linear" router has none).
            ``attention_dropout`` (``attn_pdrop``) is accepted and unused, as in the official code.
        aux_loss_type: "mi" (official default: per router, ``H(e|x) - H(e)``, i.e. minus the mutual information
            between tokens and experts) or "switch" (per router, Switch load balancing plus
            ``router_z_loss_coef`` times the router z-loss).
        router_aux_loss_coef: weight of the auxiliary loss in the training loss (official ``aux_loss_weight``).
        router_z_loss_coef: weight of the z-loss inside the "switch" auxiliary loss (official: 0.1).
        concentration_loss_coef: weight of the load-concentration loss (marginal routing entropy over the batch;
            see ``routing_losses.concentration_loss``) added to the training loss, for task fine-tuning.
        output_router_logits: the causal LM returns every router's logits (``[batch * seq, experts]``, attention
            router then feed-forward router for each layer) and the auxiliary loss; the classifier returns neither.
        attention_experts_per_layer, mlp_experts_per_layer: per-layer expert counts, set by
            ``prune_experts`` / ``add_experts``; ``None`` means ``num_attention_experts`` / ``num_experts`` everywhere.
        pruned_attention_experts_per_layer, pruned_mlp_experts_per_layer: per-layer count of pruned experts whose
            router rows are kept so that the softmax over experts, hence every remaining gate, is unchanged by
            pruning (only with un-normalised gates); ``None`` means none.
    """

    model_type = "moduleformer"
    # not predictions: the cache (its field before and since transformers 5.24) and the router outputs
    keys_to_ignore_at_inference = ["past_key_values", "cache", "aux_loss", "router_logits"]
    _auto_class = "AutoConfig"
    attribute_map = {
        "n_embd": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "att_hidden": "attention_hidden_size",
        "ffd_hidden": "intermediate_size",
        "n_att_experts": "num_attention_experts",
        "k_att": "num_attention_experts_per_tok",
        "n_mlp_experts": "num_experts",
        "k_mlp": "num_experts_per_tok",
        "gating_size": "router_hidden_size",
        "gate_type": "router_type",
        "activation_function": "hidden_act",
        "aux_loss_weight": "router_aux_loss_coef",
        "resid_pdrop": "resid_dropout",
        "embd_pdrop": "embd_dropout",
        "attn_pdrop": "attention_dropout",
        "moe_pdrop": "router_dropout",
        "att_func": "attention_function",
        "n_positions": "max_position_embeddings",
    }

    vocab_size: int = 50295
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 1
    attention_hidden_size: int | None = None
    intermediate_size: int = 2048
    hidden_act: str = "gelu_new"
    layer_norm_epsilon: int | float = 1e-5
    initializer_range: int | float = 0.02

    num_attention_experts: int = 16
    num_attention_experts_per_tok: int = 2
    num_experts: int = 32
    num_experts_per_tok: int = 2
    router_type: str = "mlp"
    router_hidden_size: int = 256
    normalize_expert_gates: bool = False
    expert_bias: bool = False

    attention_function: str = "stickbreaking"
    position_embedding_type: str = "none"
    max_position_embeddings: int = 2048
    stick_breaking_chunk_size: int = 128
    stick_breaking_recompute_weights: bool = False

    embd_dropout: int | float = 0.0
    resid_dropout: int | float = 0.0
    attention_dropout: int | float = 0.0
    router_dropout: int | float = 0.0

    aux_loss_type: str = "mi"
    router_aux_loss_coef: int | float = 0.0
    router_z_loss_coef: int | float = 0.1
    concentration_loss_coef: int | float = 0.0
    output_router_logits: bool = False

    attention_experts_per_layer: list[int] | None = None
    mlp_experts_per_layer: list[int] | None = None
    pruned_attention_experts_per_layer: list[int] | None = None
    pruned_mlp_experts_per_layer: list[int] | None = None

    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # applies the official-name aliases first
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        self.validate_architecture()  # a ValueError here; `@strict` runs the check again, wrapped in its own error

    def head_dim(self) -> int:
        """Width of one head: ``attention_hidden_size // num_attention_heads``."""
        return self.attention_hidden_size // self.num_attention_heads

    head_dim = derived_property(head_dim, "attention_hidden_size // num_attention_heads")

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor parallelism: each rank holds a slice of every FFN expert; attention experts and routers are
        replicated."""
        return experts_tp_plan("layers.*.mlp", "input_proj", "output_proj", "input_bias" if self.expert_bias else None)

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """Expert parallelism: each rank holds whole FFN experts (their number must divide over the ranks), and the
        tokens travel to them; the router, stored in the experts module, is replicated (so not beside FSDP, which would
        shard it with the experts: `ModuleFormerPreTrainedModel.maybe_distribute_model` refuses that)."""
        banks = ["input_proj", "output_proj"] + (["input_bias", "output_bias"] if self.expert_bias else [])
        return experts_ep_plan("layers.*.mlp", banks)

    @property
    def shares_hidden_states_as_kv(self) -> bool:
        """The official rule: one head as wide as the model means keys = values = the normalised hidden states."""
        return self.num_attention_heads == 1 and self.attention_hidden_size == self.hidden_size

    def layer_experts(self, layer_idx: int) -> tuple[int, int, int, int]:
        """`(attention experts, pruned attention router rows, FFN experts, pruned FFN router rows)` of a layer."""

        def pick(per_layer, default):
            return default if per_layer is None else per_layer[layer_idx]

        return (
            pick(self.attention_experts_per_layer, self.num_attention_experts),
            pick(self.pruned_attention_experts_per_layer, 0),
            pick(self.mlp_experts_per_layer, self.num_experts),
            pick(self.pruned_mlp_experts_per_layer, 0),
        )

    def validate_architecture(self):
        """Every field's allowed values (see `config_checks`)."""
        check_derived_set(self, ("attention_hidden_size",))
        require(
            not getattr(self, "sample_topk", 0),
            f"sample_topk={getattr(self, 'sample_topk', 0)}: stochastic top-k routing is not implemented; allowed: 0.",
        )

        check_positive(
            self,
            ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "attention_hidden_size",
             "intermediate_size", "num_attention_experts", "num_attention_experts_per_tok", "num_experts",
             "num_experts_per_tok", "router_hidden_size", "max_position_embeddings", "stick_breaking_chunk_size"),
        )  # fmt: skip
        check_non_negative(self, ("router_aux_loss_coef", "router_z_loss_coef", "concentration_loss_coef"))
        check_dropouts(self, ("embd_dropout", "resid_dropout", "attention_dropout", "router_dropout"))
        check_choices(
            self,
            {"attention_function": ATTENTION_FUNCTIONS, "position_embedding_type": POSITION_EMBEDDING_TYPES,
             "router_type": ROUTER_TYPES, "aux_loss_type": AUX_LOSS_TYPES},
        )  # fmt: skip
        check_common(self, epsilon="layer_norm_epsilon")
        require(
            self.attention_hidden_size % self.num_attention_heads == 0,
            f"attention_hidden_size={self.attention_hidden_size} (att_hidden) must be divisible by "
            f"num_attention_heads={self.num_attention_heads} (n_head).",
        )
        for name in (
            "attention_experts_per_layer",
            "mlp_experts_per_layer",
            "pruned_attention_experts_per_layer",
            "pruned_mlp_experts_per_layer",
        ):
            per_layer = getattr(self, name)
            require(
                per_layer is None or len(per_layer) == self.num_hidden_layers,
                f"{name} has {len(per_layer or [])} entries; it needs one per layer (num_hidden_layers="
                f"{self.num_hidden_layers}) or None.",
            )
            smallest = 0 if name.startswith("pruned") else 1
            for layer_idx, count in enumerate(per_layer or []):
                require(count >= smallest, f"{name}[{layer_idx}]={count} must be >= {smallest}.")
            require(
                not (name.startswith("pruned") and any(per_layer or []) and self.normalize_expert_gates),
                f"{name}={per_layer} keeps pruned experts' router rows for the softmax normaliser, which "
                "normalize_expert_gates=True divides out; allowed with normalize_expert_gates=True: None or zeros.",
            )
        # per-layer counts when given, else the one count every layer has (no loop over an unchecked layer count)
        for layer_idx, num_attention in enumerate(self.attention_experts_per_layer or [self.num_attention_experts]):
            require(
                self.num_attention_experts_per_tok <= num_attention,
                f"num_attention_experts_per_tok={self.num_attention_experts_per_tok} (k_att) is larger than the "
                f"{num_attention} attention experts of layer {layer_idx}; allowed: 1..{num_attention}.",
            )
        for layer_idx, num_mlp in enumerate(self.mlp_experts_per_layer or [self.num_experts]):
            require(
                self.num_experts_per_tok <= num_mlp,
                f"num_experts_per_tok={self.num_experts_per_tok} (k_mlp) is larger than the {num_mlp} feed-forward "
                f"experts of layer {layer_idx}; allowed: 1..{num_mlp}.",
            )


__all__ = ["ModuleFormerConfig"]
