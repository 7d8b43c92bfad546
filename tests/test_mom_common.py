"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`, from the sdist
of the installed version) and our `GenerationTesterMixin`, run against MoM. See tests/hf_common.py.

The tiny model has an unrolled depth of 2 (`test_num_layers_is_small`): one chunk, no plain bottom/top/anchor
blocks, two rounds, learned routing with K=2 of 3 modules + SKIP per pool and GRU routers, so routing, SKIP, the
routers' state across rounds and the per-round KV-cache slots are all exercised. With K=2 of 4 choices, 21 tokens
and near-uniform routers at init, every module is picked (a module left out has probability ~1e-6), so
`test_all_params_have_gradient` stays on.

Why each skipped test does not apply (`pytest -rs` shows the upstream reasons):
- No accelerator, flash-attn, kernels, MPS or deepspeed here: `test_flash_attn_*` (2, 3, 4, kernels, MPS),
  `test_kernels_can_load_without_crashing`, `test_cpu_offload`, `test_disk_offload_*`, `test_model_parallelism`,
  `test_can_load_with_device_context_manager`, `test_can_load_with_global_device_set`,
  `test_flex_attention_with_grads`, `test_sdpa_can_compile_dynamic`, `test_sdpa_can_dispatch_on_flash`,
  `test_*_with_deepspeed*`, and `test_torch_compile_for_training` (also @slow, and it needs a
  `_torch_compile_train_cls`).
- Not a composite / encoder-decoder model: `test_attn_implementation_composite_models`,
  `test_can_set_attention_dynamically_composite_model`, `test_sdpa_can_dispatch_composite_models` (its "does not
  support SDPA" message is printed for any non-composite model; eager == sdpa is checked by the 24
  `test_eager_matches_sdpa_inference_*` cases, which run), `test_internal_model_config_and_subconfig_are_same`,
  `test_encoder_decoder_loss_no_double_shift`.
- GPT-2-style learned absolute positions, no RoPE and no sliding window: `test_model_rope_*`, `test_vision_axial_rope`,
  `test_sliding_window_mask`; `test_resize_position_vector_embeddings` (like GPT-2, MoM does not implement
  `resize_position_embeddings`: new rows of a learned table would be untrained).
- No tensor-parallel plan (`test_tp_plan_matches_params`, `test_tied_head_has_a_tp_plan_entry`): sharding per-token
  routed module pools would need an expert-parallel plan; not part of this CPU-first plugin's contract.
- No load-time checkpoint key conversion (`test_reverse_loading_mapping`, `test_can_load_from_already_mapped_keys`):
  MoM checkpoints are only ever written by this package; GPT-2 seeding is the offline `conversion/` script.
- MoM's module pools dispatch through our shared `moe_dispatch` (grouped_mm where supported, tested equal to a naive
  reference in tests/test_moe_dispatch.py), not through transformers' `@use_experts_implementation` experts
  interface, whose Mixtral-shaped contract (gate_up_proj/down_proj experts fed top-k indices) does not fit assembled
  attention modules with their own LayerNorms: `test_eager_matches_batched_and_grouped_inference_*` and
  `test_moe_models_record_router_logits` (which only looks for that decorator in the source; recording and
  returning `router_logits` is checked by `test_output_router_logits_from_config`, which runs, and by our
  `test_generate_with_router_logits`).
"""

import unittest

from modeling_mom import (
    MoMConfig,
    MoMForCausalLM,
    MoMForQuestionAnswering,
    MoMForSequenceClassification,
    MoMForTokenClassification,
    MoMModel,
)

from .hf_common import CausalLMModelTest, CausalLMModelTester


class MoMModelTester(CausalLMModelTester):
    config_class = MoMConfig
    base_model_class = MoMModel
    causal_lm_class = MoMForCausalLM
    sequence_classification_class = MoMForSequenceClassification
    token_classification_class = MoMForTokenClassification
    question_answering_class = MoMForQuestionAnswering
    config_kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
        num_bottom_layers=0,
        num_top_layers=0,
        num_chunks=1,
        use_anchor_layers=False,
        num_rounds=2,
        num_attention_modules=3,
        num_ffn_modules=3,
        num_modules_per_tok=2,
        enable_skip=True,
        router_type="gru",
        router_hidden_size=16,
        routing_mode="learned",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


class MoMCommonTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = MoMModelTester
    # GPU offload tests: the routed chunk is one no-split module holding ~78% of this tiny model, and accelerate keeps
    # room for the largest no-split module on every device that offloads, so below ~90% of the model on the GPU
    # nothing but the (~10%) token embedding fits there (the default [0.5, 0.7, 0.9] offloads everything).
    model_split_percents = [0.5, 0.9, 0.95]
