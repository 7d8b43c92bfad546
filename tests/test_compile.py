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

# Each case costs 20-40 s of tracing, mostly recompiles (grad mode, each cache layer's first update, each new set of
# expert row counts), so each model is the smallest that takes every code path once: MoM with the GRU router, whose
# state is carried from round to round, and two modules per token (its default router is a plain Linear-ReLU-Linear,
# and one module per token is the same code); MoEUT's two distinct layers without a repeat; one ModuleFormer layer
# whose 40 tokens make two full stick-breaking blocks and a partial one.
MODELS = {
    "mom-gru-k2": lambda: MoMForCausalLM(test_mom.tiny_config(router_type="gru", num_modules_per_tok=2)),
    "moeut": lambda: MoEUTForCausalLM(test_moeut.tiny_config(num_hidden_layers=2)),
    "moduleformer-stickbreaking": lambda: ModuleFormerForCausalLM(
        test_moduleformer.tiny_config(num_hidden_layers=1, stick_breaking_chunk_size=16)),
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
