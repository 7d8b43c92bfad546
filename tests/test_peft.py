"""LoRA through peft on the stacked expert / module weights (`LoraConfig(target_parameters=...)`): the adapter's
change reaches every path that reads the weights, so the adapted model computes what the merged model computes.

MoM reads its pools per module (sequential routing unbinds them once per forward): a pool wrapped by peft must be
read inside its own call, where peft applies the delta; it used to be read outside it (the delta was silently
ignored) or to fail on an attribute the wrapper lacks. Tolerance: the merged weight W + BA is summed in another
order than (W + BA) computed per call, fp32 rounding ~1e-6 on logits of order 1; we allow 1e-5.
"""

import pytest
import torch

from modeling_mom import ModuleFormerForCausalLM, MoEUTForCausalLM, MoMForCausalLM

from . import test_moduleformer, test_moeut, test_mom

peft = pytest.importorskip("peft")

CASES = {
    "mom-sequential": (MoMForCausalLM, test_mom.tiny_config(routing_mode="sequential"), ["qkv_proj", "up_proj"]),
    "mom-learned": (MoMForCausalLM, test_mom.tiny_config(num_modules_per_tok=2), ["qkv_proj", "down_proj"]),
    "moeut": (MoEUTForCausalLM, test_moeut.tiny_config(), ["up_proj", "v_experts"]),
    "moduleformer": (ModuleFormerForCausalLM, test_moduleformer.tiny_config(), ["input_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_lora_on_stacked_weights_equals_the_merged_model(case):
    model_class, config, targets = CASES[case]
    torch.manual_seed(0)
    base = model_class(config).eval()
    ids = torch.randint(3, 50, (2, 7))
    base_logits = base(ids).logits
    lora = peft.LoraConfig(target_modules=[], target_parameters=targets, r=2, init_lora_weights=False)
    adapted = peft.get_peft_model(base, lora).eval()
    logits = adapted(ids).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter changes the function
    loss = adapted.train()(ids, labels=ids).loss
    loss.backward()
    lora_grads = [p.grad for name, p in adapted.named_parameters() if "lora_" in name]
    assert lora_grads and all(g is not None and g.abs().max() > 0 for g in lora_grads)
    merged = adapted.eval().merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, logits, atol=1e-5, rtol=0)
