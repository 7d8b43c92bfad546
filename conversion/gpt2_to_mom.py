"""Seed a Mixture-of-Modules (MoM) model from a GPT-2 checkpoint (phase 2 of the paper's two-phase training).

    python -m conversion.gpt2_to_mom --gpt2 SRC --out DIR [--overwrite] [structure options]

SRC is a local GPT-2 directory or a hub id (e.g. ``openai-community/gpt2``). The structure options mirror the
``MoMConfig`` fields (``--num-rounds`` sets ``num_rounds``, ``--no-skip`` clears ``enable_skip``, ...); unset ones
keep the config's defaults, except ``num_rounds``, which defaults to the number of GPT-2 layers seeding each chunk.

GPT-2's layers are consumed in order, as in the authors' ``get_layer_map`` (``mom/utils.py``): the bottom blocks,
then for every chunk M = max(num_attention_modules, num_ffn_modules) consecutive layers (module j of chunk c is
GPT-2 layer ``b + c * (M + anchor) + j``; the attention pool takes the first ``num_attention_modules`` of them, the
FFN pool the first ``num_ffn_modules``) followed by its anchor block, then the top blocks. So the structure must
satisfy ``b + t + num_chunks * (M + use_anchor_layers) = n_layer``. An attention module is GPT-2's (``ln_1``,
``attn.c_attn``, ``attn.c_proj``), an FFN module its (``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``); both keep GPT-2's
Conv1D ``[in, out]`` layout. Embeddings, positions and ``ln_f`` (which the authors' loader forgets) are copied too,
as are the dropout rates, the LayerNorm epsilon and the vocabulary, BOS and EOS ids.

With ``--routing-mode sequential`` and ``num_rounds = num_attention_modules = num_ffn_modules``, round h of every
chunk runs module h with weight 1: the converted model computes GPT-2's function (equal logits within fp32
rounding). ``--exact`` (``convert(..., exact=True)``) selects that form; with no chunk structure given it puts all
GPT-2 layers into one chunk (no bottom, top or anchor layers), the simplest structure that fits any GPT-2. With
learned routing (the default) the routers are newly initialised (``--seed``) and must be trained (the model adds
its load-balancing loss to the loss in training); a pool with a single choice (one module, no SKIP) has none.

The checkpoint is written in float32, to a temporary directory next to DIR that is renamed into place only once
complete. It loads with ``AutoModelForCausalLM`` after ``import modeling_mom``, or with ``trust_remote_code=True``
without the package (the modeling code is copied next to the weights). Tokenizer files found in SRC are copied.
"""

import argparse
import functools
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_mom import MoMConfig, MoMForCausalLM
from modeling_mom.configuration_mom import ROUTER_TYPES, ROUTER_WEIGHTINGS, ROUTING_MODES
from modeling_mom.modeling_mom import layer_schedule

from .checkpoint_writer import add_output_arguments, convert_and_save
from .gpt2_source import check_convertible, check_seed, copy_embeddings_and_head, gpt2_config_of, load_gpt2

# MoMConfig fields `convert` accepts; the rest (widths, vocabulary, activation, ...) are GPT-2's.
STRUCTURE_FIELDS = (
    "num_bottom_layers",
    "num_top_layers",
    "num_chunks",
    "num_attention_modules",
    "num_ffn_modules",
    "num_rounds",
    "num_modules_per_tok",
    "use_anchor_layers",
    "enable_skip",
    "router_type",
    "router_hidden_size",
    "router_temperature",
    "router_weighting",
    "sign_router_weights",
    "weighted_qkv",
    "routing_mode",
    "router_aux_loss_coef",
    "router_aux_loss_per_round",
    "output_router_logits",
    # seeded from GPT-2, but may be changed
    "embd_dropout",
    "resid_dropout",
    "attention_dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# MoM pool parameter <- GPT-2 block parameter (both [in, out] for projections)
ATTENTION_MAP = {
    "norm.weight": "ln_1.weight",
    "norm.bias": "ln_1.bias",
    "qkv_proj": "attn.c_attn.weight",
    "qkv_bias": "attn.c_attn.bias",
    "out_proj": "attn.c_proj.weight",
    "out_bias": "attn.c_proj.bias",
}
FFN_MAP = {
    "norm.weight": "ln_2.weight",
    "norm.bias": "ln_2.bias",
    "up_proj": "mlp.c_fc.weight",
    "up_bias": "mlp.c_fc.bias",
    "down_proj": "mlp.c_proj.weight",
    "down_bias": "mlp.c_proj.bias",
}


def _layers_per_chunk(config: MoMConfig) -> int:
    """M: GPT-2 layers seeding one chunk's pools."""
    return max(config.num_attention_modules, config.num_ffn_modules)


def gpt2_layers_used(config: MoMConfig) -> int:
    """GPT-2 layers the structure consumes: bottom + top + chunks * (M + anchor)."""
    per_chunk = _layers_per_chunk(config) + int(config.use_anchor_layers)
    return config.num_bottom_layers + config.num_top_layers + config.num_chunks * per_chunk


def gpt2_layer_map(config: MoMConfig) -> list[list[int]]:
    """For each MoM layer (`model.model.layers` order), the GPT-2 layers seeding its module pools, in slot order."""
    routed, _ = layer_schedule(config)
    layer_map, next_layer = [], 0
    for is_chunk in routed:
        width = _layers_per_chunk(config) if is_chunk else 1
        layer_map.append(list(range(next_layer, next_layer + width)))
        next_layer += width
    return layer_map


def _fitting_structures(n_layer: int, config: MoMConfig) -> list[str]:
    """Structures close to `config` that use exactly `n_layer` GPT-2 layers, as `field=value` strings."""
    chunks, modules, anchor = config.num_chunks, _layers_per_chunk(config), int(config.use_anchor_layers)
    per_chunk, inner = modules + anchor, n_layer - config.num_bottom_layers - config.num_top_layers
    fits = []
    if chunks * per_chunk <= n_layer:  # same chunks, other bottom/top split
        rest = n_layer - chunks * per_chunk
        split = f" (or any split summing to {rest})" if rest > 1 else ""
        fits.append(f"num_bottom_layers={rest // 2}, num_top_layers={rest - rest // 2}{split}")
    if inner > 0 and inner % per_chunk == 0 and inner // per_chunk != chunks:  # same bottom/top, other chunk count
        fits.append(f"num_chunks={inner // per_chunk}")
    elif n_layer < chunks * per_chunk and n_layer >= per_chunk:  # as many chunks of this shape as fit
        most = n_layer // per_chunk
        fits.append(f"num_chunks={most} with num_bottom_layers + num_top_layers = {n_layer - most * per_chunk}")
    if inner > 0 and chunks > 0 and inner % chunks == 0 and inner // chunks - anchor >= 1:  # other pool size
        fits.append(f"num_attention_modules=num_ffn_modules={inner // chunks - anchor}")
    if not fits:
        fits.append(
            f"num_bottom_layers=0, num_top_layers=0, num_chunks=1, use_anchor_layers=False, "
            f"num_attention_modules=num_ffn_modules={n_layer}"
        )
    return fits


def mom_config(gpt2_config: GPT2Config, **structure) -> MoMConfig:
    """The MoM config of a GPT-2 seeded with `structure` (MoMConfig fields from `STRUCTURE_FIELDS`).

    Raises ValueError, before any weight is touched, for an unknown field, a GPT-2 whose attention MoM cannot
    express, an invalid MoM structure, or a structure that does not use exactly GPT-2's `n_layer` layers.
    """
    unknown = sorted(set(structure) - set(STRUCTURE_FIELDS))
    if unknown:
        raise ValueError(f"unknown structure option(s) {unknown}; allowed: {', '.join(STRUCTURE_FIELDS)}.")
    check_convertible(gpt2_config)
    structure = dict(structure)
    if "num_rounds" not in structure:  # one round per seeded layer: the unrolled depth stays GPT-2's
        structure["num_rounds"] = max(
            structure.get("num_attention_modules", MoMConfig.num_attention_modules),
            structure.get("num_ffn_modules", MoMConfig.num_ffn_modules),
        )
    fields = dict(
        vocab_size=gpt2_config.vocab_size,
        max_position_embeddings=gpt2_config.n_positions,
        hidden_size=gpt2_config.n_embd,
        num_attention_heads=gpt2_config.n_head,
        intermediate_size=gpt2_config.n_inner or 4 * gpt2_config.n_embd,
        hidden_act=gpt2_config.activation_function,
        layer_norm_epsilon=gpt2_config.layer_norm_epsilon,
        initializer_range=gpt2_config.initializer_range,
        embd_dropout=gpt2_config.embd_pdrop,
        resid_dropout=gpt2_config.resid_pdrop,
        attention_dropout=gpt2_config.attn_pdrop,
        bos_token_id=gpt2_config.bos_token_id,
        eos_token_id=gpt2_config.eos_token_id,
        pad_token_id=gpt2_config.pad_token_id,
        tie_word_embeddings=gpt2_config.tie_word_embeddings,
    )
    config = MoMConfig(**{**fields, **structure})
    used, n_layer = gpt2_layers_used(config), gpt2_config.n_layer
    if used != n_layer:
        modules = _layers_per_chunk(config)
        raise ValueError(
            "the structure uses num_bottom_layers + num_top_layers + num_chunks * (max(num_attention_modules, "
            f"num_ffn_modules) + use_anchor_layers) = {config.num_bottom_layers} + {config.num_top_layers} + "
            f"{config.num_chunks} * ({modules} + {int(config.use_anchor_layers)}) = {used} GPT-2 layers, but the "
            f"GPT-2 has n_layer={n_layer}. Structures that fit: " + "; or ".join(_fitting_structures(n_layer, config))
        )
    return config


def exact_structure(n_layer: int, **structure) -> dict:
    """`structure` completed to the function-preserving form: sequential routing, one round per seeded module.

    Unset fields default to one chunk of `n_layer` modules. Raises ValueError for a field that contradicts it.
    """
    if structure.get("routing_mode", "sequential") != "sequential":
        raise ValueError(f"exact=True needs routing_mode='sequential'; got {structure['routing_mode']!r}.")
    defaults = dict(num_bottom_layers=0, num_top_layers=0, num_chunks=1, use_anchor_layers=False)
    if not any(name in structure for name in (*defaults, "num_attention_modules", "num_ffn_modules")):
        structure = {**defaults, "num_attention_modules": n_layer, "num_ffn_modules": n_layer, **structure}
    modules = structure.get("num_attention_modules", MoMConfig.num_attention_modules)
    rounds = structure.setdefault("num_rounds", modules)
    if not rounds == modules == structure.get("num_ffn_modules", MoMConfig.num_ffn_modules):
        raise ValueError(
            "exact=True needs num_rounds == num_attention_modules == num_ffn_modules (each round runs its own "
            f"seeded layer); got {rounds}, {modules}, {structure.get('num_ffn_modules', MoMConfig.num_ffn_modules)}."
        )
    return {**structure, "routing_mode": "sequential"}


def _stack(blocks, name: str) -> torch.Tensor:
    return torch.stack([block.get_parameter(name) for block in blocks])


@torch.no_grad()
def convert(
    gpt2: str | os.PathLike | GPT2LMHeadModel, seed: int = 0, exact: bool = False, **structure
) -> MoMForCausalLM:
    """A `MoMForCausalLM` (float32, eval mode) seeded from `gpt2`: a `GPT2LMHeadModel`, a directory or a hub id.

    `structure`: MoMConfig fields (see `STRUCTURE_FIELDS`), e.g. `num_chunks=2, num_attention_modules=4,
    routing_mode="sequential"`. `num_rounds` defaults to max(num_attention_modules, num_ffn_modules). `exact=True`
    selects the function-preserving form (see :func:`exact_structure`). `seed` seeds the routers' initialisation
    (the only weights not taken from GPT-2). Raises ValueError for a structure that does
    not fit the GPT-2 (the message suggests structures that do), before the weights are loaded.
    """
    check_seed(seed)
    gpt2_config = gpt2_config_of(gpt2)
    if exact:
        structure = exact_structure(gpt2_config.n_layer, **structure)
    config = mom_config(gpt2_config, **structure)
    gpt2 = load_gpt2(gpt2)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoMForCausalLM(config)
    copy_embeddings_and_head(gpt2, model)
    for layer, gpt2_layers in zip(model.model.layers, gpt2_layer_map(config), strict=True):
        blocks = [gpt2.transformer.h[i] for i in gpt2_layers]
        for pool, name_map in ((layer.attention, ATTENTION_MAP), (layer.mlp, FFN_MAP)):
            for name, gpt2_name in name_map.items():
                pool.get_parameter(name).copy_(_stack(blocks[: pool.num_modules], gpt2_name))
    return model.eval()


def summary(model: MoMForCausalLM) -> str:
    """A few lines describing the converted model's structure, routing, size and depth."""
    config = model.config
    chunk = (
        f"{config.num_chunks} chunk(s) x [{config.num_attention_modules} attention + {config.num_ffn_modules} FFN "
        f"modules, {config.num_rounds} rounds, "
        f"{'all modules' if config.routing_mode == 'all_modules' else f'top-{config.num_modules_per_tok}'}"
        f"{', SKIP' if config.enable_skip else ''}]{' + anchor' if config.use_anchor_layers else ''}"
    )
    routers = sum(p.numel() for n, p in model.named_parameters() if "router" in n)
    if config.routing_mode == "sequential":
        exact = config.num_rounds == config.num_attention_modules == config.num_ffn_modules
        routing = "sequential (round h runs module h): " + (
            "computes GPT-2's function" if exact else f"runs {config.num_rounds} of each chunk's seeded layers"
        )
    elif not routers:
        routing = "no routers (single-choice pools: every round runs each pool's only module)"
    else:
        variants = "".join(
            f", {name}" for name in ("sign_router_weights", "weighted_qkv") if getattr(config, name)
        )
        routing = (
            f"{config.routing_mode} ({config.router_type} routers, {config.router_weighting} weights{variants}, newly "
            f"initialised: train them; balancing loss weight {config.router_aux_loss_coef})"
        )
    return "\n".join(
        [
            (
                f"  structure:  {config.num_bottom_layers} bottom + {chunk} + {config.num_top_layers} top "
                f"(from {gpt2_layers_used(config)} GPT-2 layers)"
            ),
            f"  routing:    {routing}",
            f"  parameters: {model.num_parameters():,} ({routers:,} in routers)",
            f"  unrolled depth: {config.num_hidden_layers} attention + FFN applications per token",
        ]
    )


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpt2", required=True, help="GPT-2 checkpoint directory or hub id")
    add_output_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the routers' initialisation")
    parser.add_argument(
        "--exact", action="store_true", help="function-preserving form: sequential routing, one round per module"
    )
    structure = parser.add_argument_group(
        "structure (MoMConfig fields; unset = the config's default, or with --exact one chunk of all GPT-2 layers)"
    )
    for name in ("num_bottom_layers", "num_top_layers", "num_chunks", "num_attention_modules", "num_ffn_modules"):
        structure.add_argument("--" + name.replace("_", "-"), type=int)
    structure.add_argument("--num-rounds", type=int, help="H (default: max(num_attention_modules, num_ffn_modules))")
    structure.add_argument("--num-modules-per-tok", type=int, help="K")
    structure.add_argument("--no-anchor-layers", dest="use_anchor_layers", action="store_const", const=False)
    structure.add_argument("--no-skip", dest="enable_skip", action="store_const", const=False)
    structure.add_argument("--router-type", choices=ROUTER_TYPES)
    structure.add_argument("--router-hidden-size", type=int)
    structure.add_argument("--router-temperature", type=float)
    structure.add_argument("--router-weighting", choices=ROUTER_WEIGHTINGS)
    structure.add_argument("--routing-mode", choices=ROUTING_MODES)
    structure.add_argument("--router-aux-loss-coef", type=float)
    structure.add_argument("--router-aux-loss-per-round", action="store_const", const=True,
                           help="average per-round balancing losses (the authors' depthwise_bal_loss)")
    structure.add_argument("--sign-router-weights", action="store_const", const=True,
                           help="weight modules by the sign of their weight, straight-through (the authors' use_ste)")
    structure.add_argument("--weighted-qkv", action="store_const", const=True,
                           help="weight the attention modules' Q, K, V too (the authors' weighted_qkv)")
    return parser


def main(argv: list[str] | None = None, add_files=None, prog: str = "python -m conversion.gpt2_to_mom"):
    """The command line; `add_files(directory)` writes more files into the checkpoint before it is complete; `prog`
    names the command in its usage and errors."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    structure = {name: value for name in STRUCTURE_FIELDS if (value := getattr(args, name, None)) is not None}
    build = functools.partial(convert, args.gpt2, seed=args.seed, exact=args.exact, **structure)
    model, copied = convert_and_save(parser, args, build, tokenizer_source=args.gpt2, add_files=add_files)
    print(f"MoM seeded from {args.gpt2} -> {args.out}")
    print(summary(model))
    print(f"  tokenizer:  {', '.join(copied) if copied else 'none found in --gpt2'}")


if __name__ == "__main__":
    main()
