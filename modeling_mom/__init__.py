"""modeling_mom: modular language models (MoM, MoEUT, ModuleFormer) as Hugging Face Transformers models.

Importing the package registers every architecture with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
`AutoModelForSequenceClassification`, `AutoModelForTokenClassification` and `AutoModelForQuestionAnswering`
(idempotently).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_moduleformer import ModuleFormerConfig
from .configuration_moeut import MoEUTConfig
from .configuration_mom import MoMConfig
from .modeling_moduleformer import (
    ModuleFormerForCausalLM,
    ModuleFormerForQuestionAnswering,
    ModuleFormerForSequenceClassification,
    ModuleFormerForTokenClassification,
    ModuleFormerModel,
    ModuleFormerPreTrainedModel,
)
from .modeling_moeut import (
    MoEUTForCausalLM,
    MoEUTForQuestionAnswering,
    MoEUTForSequenceClassification,
    MoEUTForTokenClassification,
    MoEUTModel,
    MoEUTPreTrainedModel,
)
from .modeling_mom import (
    MoMForCausalLM,
    MoMForQuestionAnswering,
    MoMForSequenceClassification,
    MoMForTokenClassification,
    MoMModel,
    MoMPreTrainedModel,
)

__version__ = "0.1.0"

_ARCHITECTURES = {  # config class -> its model classes, in the order of _AUTO_CLASSES
    MoMConfig: (MoMModel, MoMForCausalLM, MoMForSequenceClassification, MoMForTokenClassification,
                MoMForQuestionAnswering),
    MoEUTConfig: (MoEUTModel, MoEUTForCausalLM, MoEUTForSequenceClassification, MoEUTForTokenClassification,
                  MoEUTForQuestionAnswering),
    ModuleFormerConfig: (ModuleFormerModel, ModuleFormerForCausalLM, ModuleFormerForSequenceClassification,
                         ModuleFormerForTokenClassification, ModuleFormerForQuestionAnswering),
}  # fmt: skip
_AUTO_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                 AutoModelForQuestionAnswering)  # fmt: skip


def _register():
    for config_class, model_classes in _ARCHITECTURES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class, model_class in zip(_AUTO_CLASSES, model_classes, strict=True):
            auto_class.register(config_class, model_class, exist_ok=True)


_register()

__all__ = [
    "MoMConfig",
    "MoMModel",
    "MoMForCausalLM",
    "MoMForSequenceClassification",
    "MoMForTokenClassification",
    "MoMForQuestionAnswering",
    "MoMPreTrainedModel",
    "MoEUTConfig",
    "MoEUTModel",
    "MoEUTForCausalLM",
    "MoEUTForSequenceClassification",
    "MoEUTForTokenClassification",
    "MoEUTForQuestionAnswering",
    "MoEUTPreTrainedModel",
    "ModuleFormerConfig",
    "ModuleFormerModel",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ModuleFormerForTokenClassification",
    "ModuleFormerForQuestionAnswering",
    "ModuleFormerPreTrainedModel",
]
