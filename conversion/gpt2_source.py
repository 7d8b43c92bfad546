"""The GPT-2 every `gpt2_to_<arch>` converter starts from: a `GPT2LMHeadModel`, a directory or a hub id, checked to
be a GPT-2 before anything is converted (another architecture's weights would load as a random GPT-2, with only a
load report to say so); and the parts every converter copies the same way (embeddings, final norm, head)."""

import os
import pickle

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from modeling_mom.workflows.common import SEED_RANGE

from .checkpoint_writer import listed


def gpt2_config_of(gpt2: str | os.PathLike | GPT2LMHeadModel) -> GPT2Config:
    """The config of `gpt2`; a TypeError for another kind of model, a ValueError for a checkpoint of another type."""
    if isinstance(gpt2, torch.nn.Module) and not isinstance(gpt2, GPT2LMHeadModel):
        raise TypeError(f"gpt2 must be a GPT2LMHeadModel, a directory or a hub id; got a {type(gpt2).__name__}.")
    if isinstance(gpt2, GPT2LMHeadModel):
        config = gpt2.config
    elif os.path.isdir(gpt2) and not os.path.isfile(os.path.join(gpt2, "config.json")):
        raise ValueError(f"{gpt2} has no config.json, so it is not a saved model; a GPT-2 checkpoint is required.")
    else:
        try:
            config = AutoConfig.from_pretrained(gpt2)
        except OSError as error:  # a missing directory, or a hub id that is not reachable
            raise ValueError(f"{gpt2} is not a GPT-2 checkpoint directory or a reachable hub id ({error}).") from error
        except StrictDataclassError as error:  # a field of the wrong type, e.g. "n_layer": 4.0
            raise ValueError(f"{gpt2} has an invalid config.json: {error}") from error
    if not isinstance(config, GPT2Config):
        raise ValueError(f"{gpt2} is a {config.model_type!r} checkpoint; a GPT-2 ('gpt2') is required.")
    return config


def check_seed(seed: int) -> None:
    """The converters' `seed` (of the routers' initialisation, or of expert noise): the range the Trainer accepts."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEED_RANGE:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32 - 1].")


def check_convertible(config: GPT2Config) -> None:
    """A ValueError naming the field for a GPT-2 computation no converted model has: attention scaled other than by
    1/sqrt(head_dim), or cross-attention layers (GPT-2 as an encoder-decoder's decoder), whose weights would be
    dropped."""
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        raise ValueError(
            "the converted attention is scaled by 1/sqrt(head_dim) only; this GPT-2 has scale_attn_weights="
            f"{config.scale_attn_weights}, scale_attn_by_inverse_layer_idx={config.scale_attn_by_inverse_layer_idx} "
            "(required: True, False)."
        )
    if config.add_cross_attention:
        raise ValueError(
            "this GPT-2 has add_cross_attention=True (it is an encoder-decoder's decoder); the converted models are "
            "decoder-only and would drop its cross-attention weights (required: False)."
        )


def load_gpt2(gpt2: str | os.PathLike | GPT2LMHeadModel) -> GPT2LMHeadModel:
    """`gpt2` as a float32 `GPT2LMHeadModel` (loaded if it is a path or hub id), after `gpt2_config_of`'s checks; a
    ValueError where the weights cannot be loaded or lack tensors its config needs."""
    gpt2_config_of(gpt2)
    if isinstance(gpt2, GPT2LMHeadModel):
        return gpt2
    try:
        model, info = GPT2LMHeadModel.from_pretrained(gpt2, dtype=torch.float32, output_loading_info=True)
    except (OSError, SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:
        # no weights, a shard missing, a damaged file, or tensors shaped unlike the config says
        raise ValueError(f"cannot load GPT-2 weights from {gpt2}: {type(error).__name__}: {error}") from error
    if info["missing_keys"]:  # left randomly initialised: the conversion would not be of this GPT-2
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{gpt2}'s weights lack {len(missing)} tensor(s) its config needs: {listed(missing)}.")
    return model


@torch.no_grad()
def copy_embeddings_and_head(gpt2: GPT2LMHeadModel, model) -> None:
    """GPT-2's token embeddings, positions (where `model` has learned positions), final LayerNorm and head into
    `model`, a causal LM whose config took GPT-2's `tie_word_embeddings`: a tied head is tied to the copied
    embeddings, an untied one (a fine-tuned GPT-2 may have one) is copied."""
    source, target = gpt2.transformer, model.model
    target.embed_tokens.weight.copy_(source.wte.weight)
    if getattr(target, "embed_positions", None) is not None:
        target.embed_positions.weight.copy_(source.wpe.weight)
    target.norm.load_state_dict(source.ln_f.state_dict())
    if model.config.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head.weight.copy_(gpt2.lm_head.weight)
