"""Seed a MoEUT from a GPT-2 checkpoint.

    python -m conversion.gpt2_to_moeut --gpt2 SRC --out DIR [--overwrite] [--exact] [--num-unique-layers G] ...

GPT-2's layouts map directly onto MoEUT's experts: each GPT-2 MLP is cut into
``--expert-size``-wide experts (``c_fc`` columns -> ``up_proj[e]``, ``c_proj`` rows -> ``down_proj[e]``; exact, since
the activation is elementwise), and each head's slices of the value and output projections become that head's value
and output experts.

``--exact`` (``convert(..., exact=True)``) gives a model computing GPT-2's function (logits equal within fp32
rounding). Each setting is needed for that:

* no layer sharing (G = number of GPT-2 layers): shared layers would force different GPT-2 layers into one;
* ``norm_scheme="pre"``: GPT-2 normalises the value and MLP inputs, which peri-LN leaves raw;
* ``hidden_act`` = GPT-2's (``gelu_new``), not ReLU;
* learned absolute positions (GPT-2's ``wpe``) and no RoPE;
* attention and expert biases (GPT-2 has them);
* all experts active (``num_experts_per_tok = num_experts``) with zero router weights: every sigmoid gate is exactly
  0.5, and the factor 2 is folded into the down-projections;
* ``num_attention_experts=1``: dense V and O; its per-head sigmoid output gate is exactly 0.5 with zero weights, and
  the 2 is folded into the output projection;
* GPT-2's head: tied to the embeddings (or copied, if the GPT-2's is untied), no output bias.

Without ``--exact`` the result is a true (shared) MoEUT seeded by upcycling, which is NOT function-preserving: shared
layer g (of G) holds the union of the experts of GPT-2 layers g, g + G, g + 2G, ... (e.g. GPT-2 small with G = 2:
6 x 24 = 144 FFN experts, 6 value/output experts per head), with randomly initialised routers (they cannot know the
repeat). The shared Q and K are those of layer g (the first of the group; averaging Q/K of different layers mixes
unrelated attention patterns); the shared LayerNorms are the group's means. GPT-2's positions, pre-LN, activation
and biases are kept by default. Each token uses ``num_experts_per_tok`` experts (default: as many as one GPT-2 MLP
has); the factor 2 of a 0.5 gate is folded into the down-projections here as well, but the gates start somewhat above
0.5 (sigmoids of small random router logits, of which the top-k picks the largest), so the FFN outputs start somewhat
larger than GPT-2's. Fields that the copied weights fix (shapes, biases, positions, the head) cannot be
overridden.

GPT-2's token ids (BOS, EOS, pad) are carried over; its dropout rates are not: MoEUT has dropout only on the
attention output (``attention_output_dropout``, 0 as in the paper), and none on the embeddings or the FFN output.

Recipe after an upcycling conversion (measured in benchmarks/results/upcycling.md, `python -m benchmarks.upcycling`):
the seeded model is not usable as is (held-out loss +0.44 nats above GPT-2's with G = 6 of 12 layers, +1.9 with
G = 2, on the small demo GPT-2); continue LM pretraining (`mom pretrain`, AdamW lr 1e-3 with warm-up, all parameters)
before any task fine-tuning. 200 short steps there closed all but 0.03-0.05 nats of the gap to the unshared model.
Prefer the largest G the memory allows (less sharing, smaller gap); ``--norm-scheme peri`` did slightly better
than GPT-2's pre-LN after training.
"""

import argparse
import functools
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from modeling_mom import MoEUTConfig, MoEUTForCausalLM
from modeling_mom.configuration_moeut import NORM_SCHEMES

from .checkpoint_writer import add_output_arguments, convert_and_save
from .gpt2_source import check_convertible, check_seed, copy_embeddings_and_head, gpt2_config_of, load_gpt2

DEFAULT_NUM_UNIQUE_LAYERS = 2  # G without --exact
GATE_AT_ZERO = 0.5  # sigmoid(0): the gate of a zero router, folded out of the down-projections as 1 / 0.5
# config fields the copied weights fix (shapes, biases, positions, the head): not overridable
SEEDED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_unique_layers", "num_attention_heads", "head_dim",
    "num_attention_experts", "num_experts", "moe_intermediate_size", "position_embedding_type",
    "max_position_embeddings", "attention_bias", "mlp_bias", "tie_word_embeddings", "lm_head_bias",
)  # fmt: skip


def moeut_config(gpt2_config, exact: bool, num_unique_layers: int | None, expert_size: int, **overrides) -> MoEUTConfig:
    """The MoEUT config seeded from a GPT-2 config (`num_unique_layers` None: 2, or n_layer with `exact`;
    `overrides`: config fields other than `SEEDED_FIELDS`, which GPT-2's weights fix)."""
    layers, d, heads = gpt2_config.n_layer, gpt2_config.n_embd, gpt2_config.n_head
    inner = gpt2_config.n_inner or 4 * d
    if expert_size < 1 or inner % expert_size:
        raise ValueError(f"expert_size={expert_size} must be a positive divisor of GPT-2's MLP width {inner}.")
    check_convertible(gpt2_config)
    if exact and num_unique_layers not in (None, layers):
        raise ValueError(f"exact=True needs num_unique_layers = GPT-2's n_layer ({layers}), got {num_unique_layers}.")
    groups = num_unique_layers if num_unique_layers is not None else layers if exact else DEFAULT_NUM_UNIQUE_LAYERS
    if groups < 1:
        raise ValueError(f"num_unique_layers={groups} must be a positive divisor of GPT-2's n_layer ({layers}).")
    if layers % groups:
        raise ValueError(f"num_unique_layers={groups} must divide GPT-2's n_layer ({layers}).")
    repeats, per_layer = layers // groups, inner // expert_size
    fields = dict(
        vocab_size=gpt2_config.vocab_size,
        hidden_size=d,
        num_hidden_layers=layers,
        num_unique_layers=groups,
        num_attention_heads=heads,
        head_dim=d // heads,
        num_attention_experts=repeats,
        num_attention_experts_per_tok=min(2, repeats),
        num_experts=repeats * per_layer,
        num_experts_per_tok=per_layer,
        moe_intermediate_size=expert_size,
        hidden_act=gpt2_config.activation_function,
        norm_scheme="pre",
        layer_norm_eps=gpt2_config.layer_norm_epsilon,
        position_embedding_type="learned_absolute",
        partial_rotary_factor=0.0,
        max_position_embeddings=gpt2_config.n_positions,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=gpt2_config.tie_word_embeddings,
        lm_head_bias=False,
        bos_token_id=gpt2_config.bos_token_id,
        eos_token_id=gpt2_config.eos_token_id,
        pad_token_id=gpt2_config.pad_token_id,
    )
    seeded = {k: v for k, v in overrides.items() if k in SEEDED_FIELDS and v != fields[k]}
    if seeded:
        raise ValueError(
            f"{seeded} would not fit the weights copied from GPT-2: these fields follow its shapes and layout "
            f"({ {k: fields[k] for k in seeded} }); choose the sharing and the expert width with num_unique_layers and "
            "expert_size instead."
        )
    if exact:
        required = {k: fields[k] for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")}
        required.update(
            num_attention_experts=1, hidden_act=gpt2_config.activation_function, norm_scheme="pre",
            layer_norm_eps=gpt2_config.layer_norm_epsilon,
            position_embedding_type="learned_absolute", partial_rotary_factor=0.0, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=gpt2_config.tie_word_embeddings, lm_head_bias=False,
        )  # fmt: skip
        conflicting = {k: v for k, v in overrides.items() if k in required and v != required[k]}
        if conflicting:
            raise ValueError(f"exact=True requires {required}; got {conflicting}.")
        fields.update(required)
    return MoEUTConfig(**{**fields, **overrides})


def _mean_state(modules) -> dict[str, torch.Tensor]:
    states = [module.state_dict() for module in modules]
    return {name: torch.stack([state[name] for state in states]).mean(0) for name in states[0]}


@torch.no_grad()
def _seed_layer(layer, blocks, config: MoEUTConfig):
    """Shared layer `layer` from the GPT-2 blocks it replaces (its repeats, in order)."""
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    layer.input_layernorm.load_state_dict(_mean_state(block.ln_1 for block in blocks))
    layer.post_attention_layernorm.load_state_dict(_mean_state(block.ln_2 for block in blocks))

    attn, first = layer.attention, blocks[0].attn  # Conv1D weights are [in, out]
    for projection, part in ((attn.q_proj, 0), (attn.k_proj, 1)):
        projection.weight.copy_(first.c_attn.weight[:, part * d : (part + 1) * d].T)
        projection.bias.copy_(first.c_attn.bias[part * d : (part + 1) * d])
    if attn.num_experts == 1:
        attn.v_proj.weight.copy_(first.c_attn.weight[:, 2 * d :].T)
        attn.v_proj.bias.copy_(first.c_attn.bias[2 * d :])
        attn.o_proj.weight.copy_(first.c_proj.weight.T / GATE_AT_ZERO)
        attn.o_proj.bias.copy_(first.c_proj.bias)
        attn.o_gate.zero_()
    else:  # expert h * N_A + r of head h = head h of the r-th block
        values = torch.stack([b.attn.c_attn.weight[:, 2 * d :].view(d, heads, head_dim) for b in blocks], 2)
        attn.v_experts.copy_(values.permute(1, 2, 0, 3).reshape(-1, d, head_dim))  # [H * N_A, d, dh]
        value_bias = torch.stack([b.attn.c_attn.bias[2 * d :].view(heads, head_dim) for b in blocks], 1)
        attn.v_bias.copy_(value_bias.reshape(-1, head_dim))
        outputs = torch.stack([b.attn.c_proj.weight.view(heads, head_dim, d) for b in blocks], 1)
        attn.o_experts.copy_(outputs.reshape(-1, head_dim, d))
        attn.o_bias.copy_(torch.stack([b.attn.c_proj.bias for b in blocks]).mean(0))

    ffn, width = layer.mlp, config.moe_intermediate_size
    experts = ffn.experts
    experts.up_proj.copy_(torch.cat([b.mlp.c_fc.weight.view(d, -1, width).transpose(0, 1) for b in blocks]))
    experts.up_proj_bias.copy_(torch.cat([b.mlp.c_fc.bias.view(-1, width) for b in blocks]))
    experts.down_proj.copy_(torch.cat([b.mlp.c_proj.weight.view(-1, width, d) for b in blocks]) / GATE_AT_ZERO)
    per_layer = experts.up_proj.shape[0] // len(blocks)  # each layer's output bias, spread over its experts
    down_bias = torch.cat([b.mlp.c_proj.bias.expand(per_layer, d) / per_layer for b in blocks])
    experts.down_proj_bias.copy_(down_bias / GATE_AT_ZERO)


@torch.no_grad()
def convert(
    gpt2: str | Path | GPT2LMHeadModel,
    exact: bool = False,
    num_unique_layers: int | None = None,
    expert_size: int = 128,
    seed: int = 0,
    **config_overrides,
) -> MoEUTForCausalLM:
    """A MoEUT seeded from `gpt2` (a checkpoint path or a `GPT2LMHeadModel`).

    `num_unique_layers` is G (default 2; `exact` needs G = n_layer, its default); `config_overrides` set MoEUT config
    fields, e.g. `num_experts_per_tok`, `num_attention_experts_per_tok`, `norm_scheme`, `output_router_logits`.
    """
    check_seed(seed)
    config = moeut_config(gpt2_config_of(gpt2), exact, num_unique_layers, expert_size, **config_overrides)
    gpt2 = load_gpt2(gpt2)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)  # the routers keep their random initialisation (zeroed below for exact)
        model = MoEUTForCausalLM(config).eval()
    copy_embeddings_and_head(gpt2, model)
    groups = config.num_unique_layers
    for g, layer in enumerate(model.model.layers):
        _seed_layer(layer, list(gpt2.transformer.h)[g::groups], config)
        if exact:
            layer.mlp.router.weight.zero_()
    return model


def main(argv=None, add_files=None, prog="python -m conversion.gpt2_to_moeut"):
    """The command line; `add_files(directory)` writes more files into the checkpoint before it is complete; `prog`
    names the command in its usage and errors."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpt2", required=True, help="GPT-2 checkpoint directory or hub id")
    add_output_arguments(parser)
    parser.add_argument("--exact", action="store_true", help="function-preserving form: equals GPT-2 (no sharing)")
    parser.add_argument(
        "--num-unique-layers", type=int, help=f"G, the number of shared layers (default {DEFAULT_NUM_UNIQUE_LAYERS}; "
        "--exact: GPT-2's n_layer)"
    )
    parser.add_argument("--expert-size", type=int, default=128, help="width of each FFN expert")
    parser.add_argument("--experts-per-tok", type=int, default=None, help="FFN experts per token (default: one MLP)")
    parser.add_argument("--norm-scheme", choices=NORM_SCHEMES, default="pre")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = dict(
        exact=args.exact, num_unique_layers=args.num_unique_layers, expert_size=args.expert_size, seed=args.seed
    )
    if args.experts_per_tok is not None:
        options["num_experts_per_tok"] = args.experts_per_tok
    if args.norm_scheme != "pre":
        options["norm_scheme"] = args.norm_scheme
    convert_and_save(
        parser, args, functools.partial(convert, args.gpt2, **options), tokenizer_source=args.gpt2, add_files=add_files
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
