"""`torch.compile` traces every architecture (forward without gradients, and a training step) and computes what the
eager model does.

The `aot_eager` backend runs the same tracing as the default one (dynamo, fake tensors, AOT autograd), which is where
our kernels used to fail: `grouped_mm`'s fake kernel takes bf16 only, and the blocked stick-breaking kernel writes into
views of its scratch buffers. It needs no C++ compiler, so it is quick. Tolerance 1e-5 (gradients: 1e-5 absolute
plus 1e-4 relative, for the larger router and embedding gradients): the compiled dispatch takes the per-expert matmul
path and sums in another order than `grouped_mm` (fp32).

Compiling with `fullgraph=True` is not supported: the dispatch reads each expert's row count on the host (see
`moe_dispatch`), as a dropless MoE on CPU must; `_can_compile_fullgraph` stays False.
"""

import pytest
import torch

from modeling_mom import ModuleFormerForCausalLM, MoEUTForCausalLM, MoMForCausalLM

from . import test_moduleformer, test_moeut, test_mom

MODELS = {
    "mom-mlp": lambda: MoMForCausalLM(test_mom.tiny_config()),
    "mom-gru-k2": lambda: MoMForCausalLM(test_mom.tiny_config(router_type="gru", num_modules_per_tok=2)),
    "moeut": lambda: MoEUTForCausalLM(test_moeut.tiny_config()),
    "moduleformer-stickbreaking": lambda: ModuleFormerForCausalLM(test_moduleformer.tiny_config()),
}


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_matches_eager(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(1, model.config.vocab_size, (2, 40))  # enough rows per expert for the grouped path
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    model.train()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for n, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, grad, atol=1e-5, rtol=1e-4, msg=n)
