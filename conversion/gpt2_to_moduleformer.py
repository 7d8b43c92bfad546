"""Seed a ModuleFormer from a GPT-2 checkpoint by upcycling: every expert starts as a copy of its GPT-2 layer.

    python -m conversion.gpt2_to_moduleformer --gpt2 SRC --out DIR [--overwrite] [--exact] [--num-experts 8] ...

* Attention experts: every expert's query and output projection is GPT-2's (``c_attn``'s query third, ``c_proj``),
  biases included; the shared key/value projections are GPT-2's key and value thirds.
* Feed-forward experts: copies of GPT-2's MLP (``--slice-mlp``: expert e gets the e-th slice of its neurons instead).
* Routers: randomly initialised (the symmetry breaking), optionally plus ``--expert-noise`` on the expert copies.

Gates are normalised over each token's k experts in both forms (``normalize_expert_gates=True``; the official
ModuleFormer leaves them un-normalised): the k selected experts start identical, so with gates summing to 1 they
compute one GPT-2 layer. ``--exact`` (``convert(..., exact=True)``) also selects softmax attention and GPT-2's learned
positions, so the model computes GPT-2's function exactly (logits equal within fp32 rounding). Without it the model
uses ModuleFormer's stick-breaking attention and no positions, which changes the function; continue training before
fine-tuning on a task. GPT-2's token ids (BOS, EOS, pad) and its embedding and residual dropout rates are carried
over (the latter two can be overridden in Python: ``convert(..., embd_dropout=..., resid_dropout=...)``).

Measured (benchmarks/results/upcycling.md, `python -m benchmarks.upcycling`, small demo GPT-2): stick-breaking with
copied experts starts 0.043 nats above GPT-2's held-out loss and, after 200 steps of `mom pretrain`, ends 0.013 below
the exact form trained the same way; ``--slice-mlp`` starts far (+3.2 nats: each token uses 2 of the 8 MLP slices)
and needs the same training to catch up. Prefer copies, then continued pretraining; use ``--exact`` to fine-tune
GPT-2's function as is.
"""

import argparse
import functools
import math
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from modeling_mom import ModuleFormerConfig, ModuleFormerForCausalLM

from .checkpoint_writer import add_output_arguments, convert_and_save
from .gpt2_source import check_convertible, check_seed, copy_embeddings_and_head, gpt2_config_of, load_gpt2

EXACT_SETTINGS = {"attention_function": "softmax", "position_embedding_type": "learned", "normalize_expert_gates": True}


def moduleformer_config(gpt2_config, exact: bool, slice_mlp: bool, **overrides) -> ModuleFormerConfig:
    """The ModuleFormer config of a GPT-2 with the given expert settings (`overrides`: config fields that GPT-2's
    weights do not fix, i.e. not its sizes, vocabulary, activation, positions or head)."""
    carried = dict(  # GPT-2's, unless overridden
        pad_token_id=gpt2_config.pad_token_id,
        embd_dropout=gpt2_config.embd_pdrop,
        resid_dropout=gpt2_config.resid_pdrop,
    )
    settings = {"attention_function": "stickbreaking", "normalize_expert_gates": True, **carried, **overrides}
    if exact:
        conflicting = {k: v for k, v in overrides.items() if k in EXACT_SETTINGS and v != EXACT_SETTINGS[k]}
        if conflicting:
            raise ValueError(f"exact=True requires {EXACT_SETTINGS}; got {conflicting}.")
        settings.update(EXACT_SETTINGS)
    inner = gpt2_config.n_inner or 4 * gpt2_config.n_embd
    num_experts = settings.get("num_experts", ModuleFormerConfig.num_experts)
    if slice_mlp:
        if inner % num_experts:
            raise ValueError(f"--slice-mlp needs num_experts={num_experts} to divide GPT-2's MLP width {inner}.")
        inner //= num_experts
    check_convertible(gpt2_config)
    if gpt2_config.n_head == 1:
        raise ValueError("a one-head GPT-2 would map to ModuleFormer's projection-free keys/values; not supported.")
    seeded = dict(
        vocab_size=gpt2_config.vocab_size,
        hidden_size=gpt2_config.n_embd,
        num_hidden_layers=gpt2_config.n_layer,
        num_attention_heads=gpt2_config.n_head,
        attention_hidden_size=gpt2_config.n_embd,
        intermediate_size=inner,
        hidden_act=gpt2_config.activation_function,
        layer_norm_epsilon=gpt2_config.layer_norm_epsilon,
        initializer_range=gpt2_config.initializer_range,
        max_position_embeddings=gpt2_config.n_positions,
        expert_bias=True,
        tie_word_embeddings=gpt2_config.tie_word_embeddings,
        bos_token_id=gpt2_config.bos_token_id,
        eos_token_id=gpt2_config.eos_token_id,
    )
    fixed = sorted(set(overrides) & set(seeded))
    if fixed:
        raise ValueError(
            f"{fixed} follow the GPT-2 being converted ({ {k: seeded[k] for k in fixed} }) and cannot be overridden; "
            "choose the experts with num_experts, num_attention_experts and their _per_tok counts."
        )
    return ModuleFormerConfig(**seeded, **settings)


def _copies(weight: torch.Tensor, num: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """`[num, *weight.shape]` copies, each plus `noise * std(weight)` Gaussian noise."""
    copies = weight.unsqueeze(0).repeat(num, *([1] * weight.dim()))
    if noise > 0:
        copies += noise * weight.std() * torch.randn(copies.shape, generator=generator)
    return copies


@torch.no_grad()
def convert(
    gpt2: str | Path | GPT2LMHeadModel,
    exact: bool = False,
    slice_mlp: bool = False,
    expert_noise: float = 0.0,
    seed: int = 0,
    **config_overrides,
) -> ModuleFormerForCausalLM:
    """A ModuleFormer seeded from `gpt2` (a checkpoint path or a `GPT2LMHeadModel`).

    `config_overrides` set ModuleFormer config fields, e.g. `num_attention_experts`, `num_attention_experts_per_tok`,
    `num_experts`, `num_experts_per_tok`, `router_hidden_size`, `attention_function`.
    """
    check_seed(seed)
    if not (math.isfinite(expert_noise) and expert_noise >= 0):
        raise ValueError(f"expert_noise={expert_noise} must be a finite number >= 0.")
    if exact and (slice_mlp or expert_noise):
        raise ValueError("exact=True needs identical expert copies: no slice_mlp and no expert_noise.")
    config = moduleformer_config(gpt2_config_of(gpt2), exact, slice_mlp, **config_overrides)
    gpt2 = load_gpt2(gpt2)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = ModuleFormerForCausalLM(config).eval()
    source, target = gpt2.transformer, model.model
    d = config.hidden_size
    copy_embeddings_and_head(gpt2, model)
    for block, layer in zip(source.h, target.layers):
        layer.input_layernorm.load_state_dict(block.ln_1.state_dict())
        layer.post_attention_layernorm.load_state_dict(block.ln_2.state_dict())
        attn, w_qkv, b_qkv = layer.self_attn, block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: [in, out]
        attn.input_proj.copy_(_copies(w_qkv[:, :d], attn.num_experts, expert_noise, generator))
        attn.input_bias.copy_(_copies(b_qkv[:d], attn.num_experts, 0.0, generator))
        attn.k_proj.weight.copy_(w_qkv[:, d : 2 * d].T)
        attn.k_proj.bias.copy_(b_qkv[d : 2 * d])
        attn.v_proj.weight.copy_(w_qkv[:, 2 * d :].T)
        attn.v_proj.bias.copy_(b_qkv[2 * d :])
        attn.output_proj.copy_(_copies(block.attn.c_proj.weight, attn.num_experts, expert_noise, generator))
        attn.output_bias.copy_(_copies(block.attn.c_proj.bias, attn.num_experts, 0.0, generator))
        mlp, c_fc, c_proj = layer.mlp, block.mlp.c_fc, block.mlp.c_proj
        if slice_mlp:  # expert e: neurons [e * inner, (e + 1) * inner)
            mlp.input_proj.copy_(c_fc.weight.view(d, mlp.num_experts, -1).permute(1, 0, 2))
            mlp.input_bias.copy_(c_fc.bias.view(mlp.num_experts, -1))
            mlp.output_proj.copy_(c_proj.weight.view(mlp.num_experts, -1, d))
        else:
            mlp.input_proj.copy_(_copies(c_fc.weight, mlp.num_experts, expert_noise, generator))
            mlp.input_bias.copy_(_copies(c_fc.bias, mlp.num_experts, 0.0, generator))
            mlp.output_proj.copy_(_copies(c_proj.weight, mlp.num_experts, expert_noise, generator))
        mlp.output_bias.copy_(_copies(c_proj.bias, mlp.num_experts, 0.0, generator))
    return model


def main(argv=None, add_files=None, prog="python -m conversion.gpt2_to_moduleformer"):
    """The command line; `add_files(directory)` writes more files into the checkpoint before it is complete; `prog`
    names the command in its usage and errors."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpt2", required=True, help="GPT-2 checkpoint directory or hub id")
    add_output_arguments(parser)
    parser.add_argument("--exact", action="store_true", help="softmax attention + learned positions: equals GPT-2")
    parser.add_argument("--slice-mlp", action="store_true", help="experts are slices of GPT-2's MLP, not copies")
    parser.add_argument("--expert-noise", type=float, default=0.0, help="relative Gaussian noise on expert copies")
    parser.add_argument("--num-attention-experts", type=int, default=ModuleFormerConfig.num_attention_experts)
    parser.add_argument(
        "--attention-experts-per-tok", type=int, default=ModuleFormerConfig.num_attention_experts_per_tok
    )
    parser.add_argument("--num-experts", type=int, default=ModuleFormerConfig.num_experts)
    parser.add_argument("--experts-per-tok", type=int, default=ModuleFormerConfig.num_experts_per_tok)
    parser.add_argument("--router-hidden-size", type=int, default=ModuleFormerConfig.router_hidden_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = dict(
        exact=args.exact,
        slice_mlp=args.slice_mlp,
        expert_noise=args.expert_noise,
        seed=args.seed,
        num_attention_experts=args.num_attention_experts,
        num_attention_experts_per_tok=args.attention_experts_per_tok,
        num_experts=args.num_experts,
        num_experts_per_tok=args.experts_per_tok,
        router_hidden_size=args.router_hidden_size,
    )
    convert_and_save(
        parser, args, functools.partial(convert, args.gpt2, **options), tokenizer_source=args.gpt2, add_files=add_files
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
