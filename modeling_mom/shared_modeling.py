"""Pieces every architecture of this package uses the same way: remote-code saving and last-token pooling."""

import torch


class RemoteCodeMixin:
    """Saves checkpoints that load through all four Auto classes with `trust_remote_code=True`.

    transformers records only the saved class in `config.auto_map`; this writes the whole map (config, base model,
    causal LM, sequence classifier) before saving, so any of them loads from a checkpoint of any of them. Each
    concrete class is marked for the Auto class that names it, so `save_pretrained` copies the code files.
    Subclasses list their classes in `_remote_code_classes` (`{"AutoModel": "XModel", ...}`).
    """

    _remote_code_classes: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for auto_class, class_name in cls._remote_code_classes.items():
            if class_name == cls.__name__:
                cls._auto_class = auto_class

    def save_pretrained(self, save_directory, *args, **kwargs):
        module = type(self).__module__.rsplit(".", 1)[-1]
        config_class = type(self.config)
        self.config.auto_map = {
            "AutoConfig": f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}",
            **{auto: f"{module}.{name}" for auto, name in self._remote_code_classes.items()},
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


def last_token_pooling(
    logits: torch.Tensor,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int | None,
) -> torch.Tensor:
    """`[B, T, L]` -> `[B, L]`: the logits at each row's last real token, for left or right padding.

    The attention mask decides which tokens are real; without one, tokens equal to `pad_token_id` are padding.
    """
    batch, seq = logits.shape[:2]
    positions = torch.arange(seq, device=logits.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask[:, -seq:].to(logits.device).bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids.to(logits.device) != pad_token_id
    elif batch == 1:
        real = torch.ones(batch, seq, dtype=torch.bool, device=logits.device)
    else:
        raise ValueError(
            "Cannot find the last token of each row of a batch larger than 1 without an attention_mask or a "
            "config.pad_token_id."
        )
    last = (positions * real).argmax(-1)
    return logits[torch.arange(batch, device=logits.device), last]
