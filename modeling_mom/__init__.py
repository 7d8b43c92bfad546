"""modeling_mom: modular language models (MoM, MoEUT, ModuleFormer) as Hugging Face Transformers models.

Importing the package registers every architecture with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification` (idempotently).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_moduleformer import ModuleFormerConfig
from .configuration_moeut import MoEUTConfig
from .configuration_mom import MoMConfig
from .modeling_moduleformer import (
    ModuleFormerForCausalLM,
    ModuleFormerForSequenceClassification,
    ModuleFormerModel,
    ModuleFormerPreTrainedModel,
)
from .modeling_moeut import MoEUTForCausalLM, MoEUTForSequenceClassification, MoEUTModel, MoEUTPreTrainedModel
from .modeling_mom import MoMForCausalLM, MoMForSequenceClassification, MoMModel, MoMPreTrainedModel

__version__ = "0.1.0"

_ARCHITECTURES = [
    (MoMConfig, MoMModel, MoMForCausalLM, MoMForSequenceClassification),
    (MoEUTConfig, MoEUTModel, MoEUTForCausalLM, MoEUTForSequenceClassification),
    (ModuleFormerConfig, ModuleFormerModel, ModuleFormerForCausalLM, ModuleFormerForSequenceClassification),
]


def _register():
    for config_class, base, causal_lm, classifier in _ARCHITECTURES:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base, exist_ok=True)
        AutoModelForCausalLM.register(config_class, causal_lm, exist_ok=True)
        AutoModelForSequenceClassification.register(config_class, classifier, exist_ok=True)


_register()

__all__ = [
    "MoMConfig",
    "MoMModel",
    "MoMForCausalLM",
    "MoMForSequenceClassification",
    "MoMPreTrainedModel",
    "MoEUTConfig",
    "MoEUTModel",
    "MoEUTForCausalLM",
    "MoEUTForSequenceClassification",
    "MoEUTPreTrainedModel",
    "ModuleFormerConfig",
    "ModuleFormerModel",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ModuleFormerPreTrainedModel",
]
