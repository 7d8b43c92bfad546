"""A float64 model computes in float64 throughout: routers and their losses included.

The routers raised their logits with `.float()`, which rounded a float64 model's gates to fp32: the logits were then
not smooth at float64 resolution and `gradcheck` (its defaults: eps 1e-6, atol 1e-5, rtol 1e-3) failed for MoEUT.
"""

import pytest
import torch

from modeling_mom import MoEUTForCausalLM, MoMForCausalLM

from .test_moduleformer import tiny_model as moduleformer_model
from .test_moeut import tiny_config as moeut_config
from .test_mom import tiny_config as mom_config

MODELS = {
    "mom": lambda: MoMForCausalLM(
        mom_config(routing_mode="learned", router_type="mlp", router_weighting="probability")
    ),
    "moeut": lambda: MoEUTForCausalLM(moeut_config()),
    "moduleformer": lambda: moduleformer_model(router_aux_loss_coef=0.1),
}


@pytest.mark.parametrize("name", MODELS)
def test_float64_model_passes_gradcheck(name):
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    embeds = model.get_input_embeddings()(torch.randint(3, 50, (1, 4))).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: model(inputs_embeds=e).logits, (embeds,), fast_mode=True)


@pytest.mark.parametrize("name", MODELS)
def test_float64_router_logits_and_losses_stay_float64(name):
    torch.manual_seed(0)
    model = MODELS[name]().double().train()
    out = model(torch.randint(3, 50, (2, 5)), labels=torch.randint(3, 50, (2, 5)), output_router_logits=True)
    assert {logits.dtype for logits in out.router_logits} == {torch.float64}
    assert out.aux_loss.dtype == torch.float64 and out.loss.dtype == torch.float64
