"""The GPT-2 every `gpt2_to_<arch>` converter starts from: a `GPT2LMHeadModel`, a directory or a hub id, checked to
be a GPT-2 before anything is converted (another architecture's weights would load as a random GPT-2, with only a
load report to say so)."""

import os

import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel


def gpt2_config_of(gpt2: str | os.PathLike | GPT2LMHeadModel) -> GPT2Config:
    """The config of `gpt2`; a TypeError for another kind of model, a ValueError for a checkpoint of another type."""
    if isinstance(gpt2, torch.nn.Module) and not isinstance(gpt2, GPT2LMHeadModel):
        raise TypeError(f"gpt2 must be a GPT2LMHeadModel, a directory or a hub id; got a {type(gpt2).__name__}.")
    config = gpt2.config if isinstance(gpt2, GPT2LMHeadModel) else AutoConfig.from_pretrained(gpt2)
    if not isinstance(config, GPT2Config):
        raise ValueError(f"{gpt2} is a {config.model_type!r} checkpoint; a GPT-2 ('gpt2') is required.")
    return config


def load_gpt2(gpt2: str | os.PathLike | GPT2LMHeadModel) -> GPT2LMHeadModel:
    """`gpt2` as a float32 `GPT2LMHeadModel` (loaded if it is a path or hub id), after `gpt2_config_of`'s checks."""
    gpt2_config_of(gpt2)
    if isinstance(gpt2, GPT2LMHeadModel):
        return gpt2
    return GPT2LMHeadModel.from_pretrained(gpt2, dtype=torch.float32)
