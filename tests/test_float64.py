"""A float64 model computes in float64 throughout: routers and their losses included.

The routers raised their logits with `.float()`, which rounded a float64 model's gates to fp32: the logits were then
not smooth at float64 resolution and `gradcheck` (its defaults: eps 1e-6, atol 1e-5, rtol 1e-3) failed for MoEUT.
"""

import pytest
import torch

from modeling_mom import MoEUTForCausalLM, MoMForCausalLM
from modeling_mom.routing_losses import sequence_entropy_loss

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


@pytest.mark.parametrize("masked", [False, True])
def test_moeut_entropy_regulariser_is_float64_exact(masked):
    """Its padding weights were fp32, which rounded the mean's normaliser: 1.5e-9 off the float64 value."""
    torch.manual_seed(0)
    batch, seq, calls, choices = 2, 5, 3, 7
    logits = [torch.randn(batch * seq, choices, dtype=torch.float64) for _ in range(calls)]
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]) if masked else torch.ones(batch, seq, dtype=torch.long)
    probs = torch.stack([logit.softmax(-1).view(batch, seq, choices) for logit in logits])  # [calls, B, T, C]
    weights = mask.to(torch.float64)[None, :, :, None]
    mean = (probs * weights).sum((0, 2)) / (weights.sum((0, 2)) * calls)  # [B, C]: over positions and calls
    expected = (mean * mean.log()).sum(-1).mean()
    loss = sequence_entropy_loss(logits, batch, mask if masked else None)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, atol=1e-14, rtol=0)
