"""Configuration of MoEUT, the Mixture-of-Experts Universal Transformer (Csordás et al., NeurIPS 2024, arXiv
2405.16039)."""

import copy
import dataclasses
import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .config_checks import (
    ValidatedConfigMixin,
    check_choices,
    check_common,
    check_dropouts,
    check_finite_positive,
    check_non_negative,
    check_positive,
    derived_property,
    is_real,
    require,
)
from .moe_tensor_parallel import attention_tp_plan, experts_ep_plan, experts_tp_plan

NORM_SCHEMES = ("peri", "pre", "post")
POSITION_EMBEDDING_TYPES = ("rope", "learned_absolute")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")  # transformers' RoPE scalings
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5  # the paper rotates the first half of each head

# The paper's six models (official training sweeps; `moeut_training_code/sweeps/*.yaml`), at the paper's vocabulary
# of 8000. The 728M model is 1280 wide: the official `profiles.py` says 1024, which gives a 582M model.
PRESETS = {
    "moeut-44m": dict(hidden_size=412, num_hidden_layers=16, num_unique_layers=2, num_attention_heads=4, head_dim=82,
                      num_attention_experts=8, num_experts=155, num_experts_per_tok=12),
    "moeut-126m": dict(hidden_size=768, num_hidden_layers=18, num_unique_layers=2, num_attention_heads=4, head_dim=96,
                       num_attention_experts=10, num_experts=254, num_experts_per_tok=12),
    "moeut-244m": dict(hidden_size=1024, num_hidden_layers=18, num_unique_layers=2, num_attention_heads=4,
                       head_dim=128, num_attention_experts=10, num_experts=387, num_experts_per_tok=16),
    "moeut-319m": dict(hidden_size=1024, num_hidden_layers=24, num_unique_layers=3, num_attention_heads=4,
                       head_dim=128, num_attention_experts=10, num_experts=338, num_experts_per_tok=16),
    "moeut-728m": dict(hidden_size=1280, num_hidden_layers=36, num_unique_layers=4, num_attention_heads=5,
                       head_dim=128, num_attention_experts=13, num_experts=467, num_experts_per_tok=20),
    "moeut-1040m": dict(hidden_size=1536, num_hidden_layers=36, num_unique_layers=4, num_attention_heads=6,
                        head_dim=128, num_attention_experts=12, num_experts=565, num_experts_per_tok=24),
}


@strict
class MoEUTConfig(ValidatedConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a MoEUT causal language model.

    ``num_unique_layers`` (G) distinct layers are applied in the order A, B, ..., A, B, ... until
    ``num_hidden_layers`` layer applications (the unrolled depth: one KV-cache slot and one hidden state each) have
    run. Each layer is SwitchHead attention followed by a sigma-MoE feed-forward block.

    Names in the official code (``RobertCsordas/moeut``): ``hidden_size`` = ``d_model``, ``num_hidden_layers`` =
    ``n_layers``, ``num_unique_layers`` = ``group_size``, ``head_dim`` = ``d_head``, ``num_experts`` /
    ``num_experts_per_tok`` / ``moe_intermediate_size`` = ``ff_n_experts`` / ``ff_k`` / ``ff_expert_size``,
    ``num_attention_experts`` / ``num_attention_experts_per_tok`` = ``att_n_experts`` / ``att_k``,
    ``router_aux_loss_coef`` / ``attention_router_aux_loss_coef`` = ``entropy_reg`` / ``att_entropy_reg``,
    ``expert_dropout`` / ``attention_expert_dropout`` = ``ff_expert_dropout`` / ``att_expert_dropout``,
    ``attention_output_dropout`` = ``dropout``, ``partial_rotary_factor`` = ``rotate_fraction``, ``rope_theta`` =
    ``rope_base``, ``initializer_range`` = the ``scale`` of ``reset_parameters``.

    RoPE is set as in every transformers v5 model: ``rope_parameters`` holds ``rope_type``, ``rope_theta`` and
    ``partial_rotary_factor``. The last two may also be given as keywords (and read or set as attributes), as older
    MoEUT configurations saved them; ``rope_parameters`` may add a transformers RoPE scaling (``{"rope_type": "yarn",
    "factor": 4.0}``, "linear", "dynamic", "llama3", "longrope") to run past the trained context.

    Args:
        vocab_size: vocabulary size (the paper used 8000-token SentencePiece vocabularies).
        hidden_size: width of the residual stream.
        num_hidden_layers: unrolled depth; a multiple of ``num_unique_layers``.
        num_unique_layers: G, the number of distinct (shared) layers.
        num_attention_heads, head_dim: attention heads and their width (``head_dim * heads`` need not equal
            ``hidden_size``).
        num_attention_experts: value and output experts per head; 1 gives dense V and O with a per-head sigmoid
            output gate (the official "disable SwitchHead" variant).
        num_attention_experts_per_tok: experts per head and token for V and for O (sigmoid gates, top-k); unused
            with a single attention expert.
        num_experts, num_experts_per_tok, moe_intermediate_size: sigma-MoE pool size, experts per token (K) and
            expert width.
        hidden_act: the experts' activation ("relu" in the paper).
        expert_dropout, attention_expert_dropout: training-only probability of hiding each expert from a token's
            top-k choice.
        attention_output_dropout: dropout on the attention output before the residual add.
        norm_scheme: "peri" (the paper: LayerNorm only in front of Q, K and the routers; V and the expert
            up-projection read the raw residual), "pre" (every sub-layer reads the normalised residual) or "post"
            (sub-layers read the raw residual; LayerNorm after each residual add; unlike the official post-LN
            ablation, the embeddings are not normalised first).
        layer_norm_eps: LayerNorm epsilon.
        rope_parameters: transformers' RoPE dictionary (see above). Its ``rope_theta`` (default 10000) is the RoPE
            base; its ``partial_rotary_factor`` (default 0.5) the fraction of each head's dims (the first ones) that
            get RoPE, the rotated width rounded down to even (the official code's rounding; transformers' RoPE
            functions get that width). 0 disables RoPE (with ``position_embedding_type="rope"``, the model then has
            no positions at all). Scaled types take their usual keys (``factor``, ...);
            ``original_max_position_embeddings`` defaults to ``max_position_embeddings``. As in every transformers
            model, "dynamic" rescales with the sequence's length while the KV cache keeps keys rotated as they were
            when cached, so past the trained context cached decoding differs from an uncached forward.
        router_aux_loss_coef, attention_router_aux_loss_coef: weights (gamma, delta) of the entropy regulariser of
            the FFN routers and of the attention V/O routers.
        output_router_logits: the causal LM returns the router logits and the weighted regulariser (``aux_loss``;
            the classifier returns neither). Training with labels adds the regulariser to the loss whenever a
            coefficient is positive, asked or not (as the official code does); evaluation losses never include it.
        position_embedding_type: "rope" (the paper; partial RoPE only) or "learned_absolute" (adds GPT-2-style learned
            positions to the embeddings, for function-preserving GPT-2 seeding; set ``partial_rotary_factor=0`` to
            drop RoPE).
        max_position_embeddings: the size of the learned position table; with a RoPE scaling, transformers' meaning:
            dynamic NTK scales past it, and yarn, llama3 and longrope take the trained context from
            ``rope_parameters["original_max_position_embeddings"]``, which defaults to it (longrope derives its
            attention scale from the ratio of the two).
        attention_bias: biases on Q, K, V (per value expert) and the attention output (GPT-2 seeding; the paper has
            none).
        mlp_bias: per-expert biases on both expert projections (GPT-2 seeding; the paper has none).
        initializer_range: the official init scale: weights get std ``initializer_range / sqrt(fan_in)``, with the
            whole bank's fan-in for the experts' output side (``num_experts * moe_intermediate_size``, ``heads *
            head_dim``); embeddings get std ``1 / sqrt(d)`` and the head PyTorch's default. None means
            ``sqrt(2 / num_hidden_layers)``.
        lm_head_bias: the output layer has a bias (untied from the embedding, as in the paper).
    """

    model_type = "moeut"
    # not predictions: the cache (its field before and since transformers 5.24) and the router outputs
    keys_to_ignore_at_inference = ["past_key_values", "cache", "aux_loss", "router_logits"]
    _auto_class = "AutoConfig"

    vocab_size: int = 8000
    hidden_size: int = 412
    num_hidden_layers: int = 16
    num_unique_layers: int = 2
    num_attention_heads: int = 4
    head_dim: int = 82
    num_attention_experts: int = 8
    num_attention_experts_per_tok: int = 2
    num_experts: int = 155
    num_experts_per_tok: int = 12
    moe_intermediate_size: int = 128
    hidden_act: str = "relu"
    expert_dropout: int | float = 0.0
    attention_expert_dropout: int | float = 0.0
    attention_output_dropout: int | float = 0.0
    norm_scheme: str = "peri"
    layer_norm_eps: int | float = 1e-5
    rope_parameters: RopeParameters | dict | None = None
    router_aux_loss_coef: int | float = 0.01
    attention_router_aux_loss_coef: int | float = 0.001
    output_router_logits: bool = False
    position_embedding_type: str = "rope"
    max_position_embeddings: int = 1024
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: int | float | None = None
    lm_head_bias: bool = True

    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.initializer_range is None and isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0:
            self.initializer_range = (2 / self.num_hidden_layers) ** 0.5
        kwargs.setdefault("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR)  # moved into rope_parameters
        super().__post_init__(**kwargs)
        self.validate_architecture()  # a ValueError here; `@strict` runs the check again, wrapped in its own error

    @classmethod
    def preset_names(cls) -> list[str]:
        """Names accepted by :meth:`from_preset`: the paper's six model sizes."""
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MoEUTConfig":
        """The paper's configuration `name` (see :meth:`preset_names`); keyword arguments override its fields or set
        any other field or attribute of the config (e.g. `num_labels`); a name that is neither (a typo) is refused."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"Unknown MoEUT preset {name!r}; allowed: {cls.preset_names()}.")
        config = cls(**PRESETS[name])
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(k for k in overrides if k not in fields and not hasattr(config, k))
        if unknown:
            raise ValueError(
                f"from_preset({name!r}): {unknown} are neither fields nor attributes of MoEUTConfig; the preset sets "
                f"{sorted(PRESETS[name])}, and any other field of MoEUTConfig can be given too."
            )
        return cls(**{**PRESETS[name], **overrides})

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor parallelism: each rank runs its share of the attention heads (their Q, K, value and output
        weights or experts, and routers) and a slice of every FFN expert; the FFN router is replicated."""
        biases = self.attention_bias
        heads = ["q_proj.weight", "k_proj.weight"] + (["q_proj.bias", "k_proj.bias"] if biases else [])
        if self.num_attention_experts > 1:
            heads += ["v_router.weight", "o_router.weight", "v_experts", "o_experts"] + (["v_bias"] if biases else [])
            attention = attention_tp_plan("layers.*.attention", heads, [], ["v_router", "o_router"])
        else:
            heads += ["v_proj.weight", "o_gate"] + (["v_proj.bias"] if biases else [])
            attention = attention_tp_plan("layers.*.attention", heads, ["o_proj.weight"], [])
        up_bias = "up_proj_bias" if self.mlp_bias else None
        return attention | experts_tp_plan("layers.*.mlp.experts", "up_proj", "down_proj", up_bias)

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """Expert parallelism: each rank holds whole FFN experts (`num_experts` must divide over the ranks), and the
        tokens travel to them; attention is split by `base_model_tp_plan` or FSDP."""
        banks = ["up_proj", "down_proj"] + (["up_proj_bias", "down_proj_bias"] if self.mlp_bias else [])
        return experts_ep_plan("layers.*.mlp.experts", banks)

    @property
    def rope_theta(self) -> float:
        """The RoPE base, ``rope_parameters["rope_theta"]``."""
        return (self.rope_parameters or {}).get("rope_theta", self.default_theta)

    @rope_theta.setter
    def rope_theta(self, value: float):
        self.rope_parameters = {**(self.rope_parameters or {}), "rope_theta": value}

    @property
    def partial_rotary_factor(self) -> float:
        """The rotated fraction of each head, ``rope_parameters["partial_rotary_factor"]``."""
        return (self.rope_parameters or {}).get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR)

    @partial_rotary_factor.setter
    def partial_rotary_factor(self, value: float):
        self.rope_parameters = {**(self.rope_parameters or {}), "partial_rotary_factor": value}

    def num_rotary_dims(self) -> int:
        """Leading dims of each head that get RoPE: ``partial_rotary_factor * head_dim``, rounded down to even."""
        rotary = int(self.partial_rotary_factor * self.head_dim + 1e-9)  # 2 / head_dim * head_dim may be 1.999...
        return rotary - rotary % 2

    num_rotary_dims = derived_property(num_rotary_dims, "partial_rotary_factor * head_dim, rounded down to even")

    def rotary_config(self) -> "MoEUTConfig":
        """A copy whose heads are the rotated width, wholly rotated: what transformers' RoPE functions (which rotate
        ``int(head_dim * partial_rotary_factor)`` dims, not rounded down to even) are given."""
        rotary = copy.copy(self)
        rotary.head_dim = self.num_rotary_dims
        rotary.rope_parameters = {**self.rope_parameters, "partial_rotary_factor": 1.0}
        rotary.standardize_rope_params()  # a dict set as an attribute may lack `rope_type` and `rope_theta`
        return rotary

    def validate_rope(self):
        """transformers' checks of ``rope_parameters``, on the rotated width (an odd head may be wholly rotated: the
        official code then rotates all its dims but the last)."""
        if self.rope_parameters and self.num_rotary_dims > 0:
            try:
                super(MoEUTConfig, self.rotary_config()).validate_rope()
            except KeyError as error:  # a key the type needs is missing
                raise ValueError(f"rope_parameters={self.rope_parameters}: {error.args[0]}") from None

    def validate_architecture(self):
        """Every field's allowed values (see `config_checks`)."""
        check_positive(
            self,
            ("vocab_size", "hidden_size", "num_hidden_layers", "num_unique_layers", "num_attention_heads", "head_dim",
             "num_attention_experts", "num_attention_experts_per_tok", "num_experts", "num_experts_per_tok",
             "moe_intermediate_size", "max_position_embeddings"),
        )  # fmt: skip
        check_non_negative(self, ("router_aux_loss_coef", "attention_router_aux_loss_coef"))
        check_dropouts(self, ("expert_dropout", "attention_expert_dropout", "attention_output_dropout"))
        check_choices(self, {"norm_scheme": NORM_SCHEMES, "position_embedding_type": POSITION_EMBEDDING_TYPES})
        check_common(self, epsilon="layer_norm_eps")
        require(
            self.num_hidden_layers % self.num_unique_layers == 0,
            f"num_hidden_layers={self.num_hidden_layers} must be a multiple of num_unique_layers="
            f"{self.num_unique_layers} (the shared layers are repeated as a whole).",
        )
        require(
            self.num_experts_per_tok <= self.num_experts,
            f"num_experts_per_tok={self.num_experts_per_tok}; allowed: 1..num_experts={self.num_experts}.",
        )
        require(
            self.num_attention_experts == 1 or self.num_attention_experts_per_tok <= self.num_attention_experts,
            f"num_attention_experts_per_tok={self.num_attention_experts_per_tok}; allowed: "
            f"1..num_attention_experts={self.num_attention_experts}.",
        )
        require(
            isinstance(self.rope_parameters, dict),
            f"rope_parameters={self.rope_parameters!r}; allowed: a dict (transformers' RoPE parameters).",
        )
        require(
            is_real(self.partial_rotary_factor) and 0 <= self.partial_rotary_factor <= 1,
            f"partial_rotary_factor={self.partial_rotary_factor!r}; allowed: a number in 0..1.",
        )
        require(
            self.partial_rotary_factor == 0 or self.num_rotary_dims > 0,
            f"partial_rotary_factor={self.partial_rotary_factor} rotates no dims of a head of head_dim={self.head_dim} "
            f"(the rotated width is rounded down to even); allowed: 0 (no RoPE) or at least 2 / head_dim = "
            f"{2 / self.head_dim!r}.",
        )
        check_finite_positive(self, ("rope_theta",))
        rope_type = self.rope_parameters.get("rope_type", "default")
        require(rope_type in ROPE_TYPES, f"rope_parameters rope_type={rope_type!r}; allowed: {ROPE_TYPES}.")
        factor = self.rope_parameters.get("factor")  # transformers only logs a bad one: factor 0 gave NaN positions
        require(
            rope_type == "default" or factor is None or (is_real(factor) and math.isfinite(factor) and factor > 0),
            f"rope_parameters factor={factor!r} (rope_type={rope_type!r}); allowed: a finite number > 0.",
        )
        minimum = {"default": 0, "dynamic": 4}.get(rope_type, 2)  # dynamic NTK divides by (rotated dims - 2)
        require(
            self.num_rotary_dims >= minimum,
            f"rope_parameters rope_type={rope_type!r} scales RoPE, but partial_rotary_factor="
            f"{self.partial_rotary_factor} rotates {self.num_rotary_dims} dims of each head; allowed: at least "
            f"{minimum}.",
        )
        self.validate_rope()  # transformers' checks of the type's keys, as a ValueError here


__all__ = ["MoEUTConfig"]
