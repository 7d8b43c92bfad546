"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`, from the sdist
of the installed version) and our `GenerationTesterMixin`, run against MoEUT. See tests/hf_common.py.

The tiny model has an unrolled depth of 2 (`test_num_layers_is_small`) made of ONE shared layer applied twice, so
layer sharing with one KV-cache slot per application is exercised; SwitchHead runs with 3 V/O experts per head (top
2) and the sigma-MoE with 2 of 6 experts, through the `@use_experts_implementation` experts class.

Skipped here, on purpose (all other skips are the sdist's own: accelerator, flash attention, deepspeed, kernels,
composite models, no TP plan, no RoPE scaling, ...):

* `test_cpu_offload` (runs only on an accelerator). The single shared layer is one no-split module holding ~80% of
  this tiny model, and accelerate reserves room for the largest no-split module on the GPU; so a GPU budget below
  the whole model leaves room for nothing else and everything lands on the CPU (no split to test), for every
  `model_split_percents` tried on an H100 (0.7 to 0.98). Unsharing the layers (G = 2) would make it pass but lose
  the shared-layer coverage of every other common test. The disk-offload tests run and pass on the H100.

* the half-precision (bf16 and fp16) variants of `test_eager_matches_sdpa_inference_*` and
  `test_eager_matches_batched_and_grouped_inference_*`. They compare whole-model outputs under a continuous
  tolerance, but MoEUT's routing is a discrete top-k of sigmoid scores: a half-precision rounding difference between
  two attention kernels (or between gating before and after the down-projection) flips near-tied top-k choices, and a
  flipped expert changes the output by far more than the tolerance. Measured on this tiny config over 20 seeds:
  every seed without a flip matched eager vs sdpa to <= 0.004 (bf16 rounding); seeds with flips differed by up to
  0.19. fp16 flips less often but does: one run of the suite (transformers 5.23, whose random inputs depend on the
  tests run before) had 26% of the outputs of the batched/grouped fp16 comparison off by up to 0.04. The fp32
  variants run and pass.
  The experts kernels are compared in bf16 with routing held fixed in tests/test_moeut.py
  (`test_experts_implementations_agree_in_bfloat16`).
"""

import unittest

from modeling_mom import (
    MoEUTConfig,
    MoEUTForCausalLM,
    MoEUTForQuestionAnswering,
    MoEUTForSequenceClassification,
    MoEUTForTokenClassification,
    MoEUTModel,
)

from .hf_common import CausalLMModelTest, CausalLMModelTester


class MoEUTModelTester(CausalLMModelTester):
    config_class = MoEUTConfig
    base_model_class = MoEUTModel
    causal_lm_class = MoEUTForCausalLM
    sequence_classification_class = MoEUTForSequenceClassification
    token_classification_class = MoEUTForTokenClassification
    question_answering_class = MoEUTForQuestionAnswering
    config_kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_unique_layers=1,
        num_attention_heads=4,
        head_dim=8,
        num_attention_experts=3,
        num_attention_experts_per_tok=2,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


class MoEUTCommonTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = MoEUTModelTester

    @unittest.skip("one shared no-split layer: accelerate cannot split this tiny model (see the module docstring)")
    def test_cpu_offload(self):
        pass


_ROUTING_FLIP_REASON = (
    "half-precision rounding flips MoEUT's discrete top-k routing, so whole-model outputs are not within a "
    "continuous tolerance; see the module docstring (fp32 variants run)."
)
_COMPARISONS = ("test_eager_matches_sdpa_inference_", "test_eager_matches_batched_and_grouped_inference_")
for _name in dir(MoEUTCommonTest):
    if _name.startswith(_COMPARISONS) and ("_bf16" in _name or "_fp16" in _name):
        setattr(MoEUTCommonTest, _name, unittest.skip(_ROUTING_FLIP_REASON)(getattr(MoEUTCommonTest, _name)))
