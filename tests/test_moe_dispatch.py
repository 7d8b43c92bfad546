"""The shared token -> expert dispatch (`modeling_mom/moe_dispatch.py`) equals a naive per-(token, slot) loop.

Every case runs forward and backward (gradients of the input rows, expert weights, bias and gates) on both
backends: `torch.nn.functional.grouped_mm` (where this torch build supports it) and the `split`/`unbind` fallback.

The reference is computed in float64 from the very same (already rounded) input values, so the measured error is
the dispatch's own rounding only:
- fp32: `atol = rtol = 1e-5`. Every value is a sum of a few dozen products of O(1) numbers (at most
  `in_features * k` = 48 for outputs, `tokens * k` for weight gradients); fp32 rounding (eps 1.2e-7) of such sums
  is ~1e-6 (measured: max abs error 1.2e-6, i.e. 1.7e-7 of the largest value), so 1e-5 leaves an 8x margin while
  any real dispatch error (a wrong row, gate or expert) is O(0.1) or more.
- bf16: `2e-2` of the largest reference value (and `rtol = 2e-2`). The matmul output, bias add, gate multiply
  and scatter-add each round to bf16 (eps 2^-8 = 3.9e-3), so errors of a few eps of the output scale are
  expected (measured: 7.2e-3 of the scale).
"""

import pytest
import torch

from modeling_mom.moe_dispatch import (
    bag_mixture,
    expert_mlp,
    gather_rows,
    gathered_linear,
    grouped_linear,
    grouped_mm_supported,
    plan_dispatch,
    scatter_rows,
)

NUM_EXPERTS, IN_FEATURES, OUT_FEATURES = 4, 16, 24  # multiples of 16 bytes in fp32 and bf16: grouped_mm can run
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _backends():
    probe = torch.zeros(1, IN_FEATURES)
    weight = torch.zeros(NUM_EXPERTS, IN_FEATURES, OUT_FEATURES)
    grouped = pytest.param(
        True,
        id="grouped_mm",
        marks=pytest.mark.skipif(
            not grouped_mm_supported(probe, weight), reason="this torch build has no CPU grouped_mm"
        ),
    )
    return [grouped, pytest.param(False, id="split_unbind")]


BACKENDS = _backends()
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def naive_dispatch(x, weight, bias, selected, gates, num_experts):
    """`out[t] = sum_j gates[t, j] * (x[t] @ weight[e] + bias[e])` with `e = selected[t, j]`, SKIP (`e >= E`) = 0."""
    rows = []
    for t in range(x.shape[0]):
        row = x.new_zeros(weight.shape[-1])
        for j in range(selected.shape[1]):
            e = int(selected[t, j])
            if e < num_experts:
                row = row + gates[t, j] * (x[t] @ weight[e] + bias[e])
        rows.append(row)
    return torch.stack(rows)


def naive_expert_ffn(x, up, down, gates, selected, up_bias=None, down_bias=None):
    """`out[t] = sum_j gates[t, j] * (relu(x[t] @ up[e] + up_bias[e]) @ down[e] + down_bias[e])` with
    `e = selected[t, j]` (no bias where None), SKIP = 0."""
    rows = []
    for t in range(x.shape[0]):
        row = x.new_zeros(down.shape[-1])
        for j, e in enumerate(selected[t].tolist()):
            if e < up.shape[0]:
                hidden = torch.relu(x[t] @ up[e] + (0 if up_bias is None else up_bias[e]))
                row = row + gates[t, j] * (hidden @ down[e] + (0 if down_bias is None else down_bias[e]))
        rows.append(row)
    return torch.stack(rows)


def dispatch(x, weight, bias, selected, gates, num_experts, use_grouped_mm):
    plan = plan_dispatch(selected, num_experts)
    rows = grouped_linear(gather_rows(x, plan), weight, plan, bias, use_grouped_mm=use_grouped_mm)
    return scatter_rows(rows, plan, x.shape[0], gates=gates)


def make_inputs(selected, dtype, transposed_weight=False, seed=0):
    """Leaf tensors (input rows, weight, bias, gates) of `dtype`, O(1) values; weight optionally a transposed view."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens, k = selected.shape

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()

    x = leaf(num_tokens, IN_FEATURES)
    if transposed_weight:  # stored [E, out, in], used as the [E, in, out] view
        weight_leaf = leaf(NUM_EXPERTS, OUT_FEATURES, IN_FEATURES, scale=IN_FEATURES**-0.5)
        weight = weight_leaf.transpose(1, 2)
    else:
        weight_leaf = weight = leaf(NUM_EXPERTS, IN_FEATURES, OUT_FEATURES, scale=IN_FEATURES**-0.5)
    bias = leaf(NUM_EXPERTS, OUT_FEATURES)
    gates = torch.rand(num_tokens, k, generator=generator).to(dtype).requires_grad_()
    return x, weight_leaf, weight, bias, gates


def assert_matches_reference(selected, dtype, use_grouped_mm, transposed_weight=False, upstream="random"):
    """Run the dispatch and the float64 naive loop on the same values; compare outputs and all four gradients."""
    x, weight_leaf, weight, bias, gates = make_inputs(selected, dtype, transposed_weight)
    out = dispatch(x, weight, bias, selected, gates, NUM_EXPERTS, use_grouped_mm)

    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight_leaf, bias, gates)]
    x64, weight_leaf64, bias64, gates64 = leaves64
    weight64 = weight_leaf64.transpose(1, 2) if transposed_weight else weight_leaf64
    ref = naive_dispatch(x64, weight64, bias64, selected, gates64, NUM_EXPERTS)

    if upstream == "random":
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    else:  # `.sum().backward()`: the upstream gradient is an expanded scalar (stride 0)
        out, ref, grad_out = out.sum(), ref.sum(), torch.ones((), dtype=dtype)
    out.backward(grad_out)
    if ref.requires_grad:  # all-SKIP: the reference is a constant zero, its gradients are zero
        ref.backward(grad_out.double())

    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOLERANCE[dtype]
    pairs = [("output", out, ref)] + [
        (name, leaf.grad, torch.zeros_like(leaf64) if leaf64.grad is None else leaf64.grad)
        for name, leaf, leaf64 in zip(("x", "weight", "bias", "gates"), (x, weight_leaf, bias, gates), leaves64)
    ]
    for name, actual, expected in pairs:
        assert actual is not None, f"no gradient reached {name}"
        scale = expected.abs().max().item() if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(actual.double(), expected, atol=tol * max(scale, 1e-12), rtol=tol, msg=name)


SKIP = NUM_EXPERTS  # any selection >= num_experts is SKIP
CASES = {
    # k=1: one expert per token, every expert used
    "k1": torch.tensor([[0], [3], [1], [2], [3], [0], [2], [1]]),
    # k=2 with SKIP selections (== E and > E) mixed in, and expert 1 receiving no tokens
    "k2_skip_empty_expert": torch.tensor(
        [[0, 2], [3, SKIP], [SKIP + 2, 0], [2, 3], [SKIP, SKIP], [3, 0], [0, 3], [2, SKIP]]
    ),
    # k=3, all experts used, tokens picking the same expert in two slots
    "k3_repeats": torch.tensor([[0, 1, 2], [3, 3, 1], [2, 0, 1], [1, 1, 1], [0, 2, 3]]),
    # a single token (decoding)
    "single_token": torch.tensor([[2, 0]]),
    # every selection is SKIP: output and all gradients are zero
    "all_skip": torch.full((5, 2), SKIP),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_grouped_mm", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_matches_naive_loop(case, use_grouped_mm, dtype):
    assert_matches_reference(CASES[case], dtype, use_grouped_mm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_grouped_mm", BACKENDS)
def test_transposed_weight_view(use_grouped_mm, dtype):
    assert_matches_reference(CASES["k2_skip_empty_expert"], dtype, use_grouped_mm, transposed_weight=True)


@pytest.mark.parametrize("use_grouped_mm", BACKENDS)
def test_stride_zero_upstream_gradient_through_scatter(use_grouped_mm):
    assert_matches_reference(CASES["k2_skip_empty_expert"], torch.float32, use_grouped_mm, upstream="sum")


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("use_grouped_mm", BACKENDS)
def test_stride_zero_gradient_straight_into_grouped_linear(use_grouped_mm, with_bias):
    """`grouped_linear(...).sum().backward()` hands grouped_mm an expanded (stride 0) gradient; the guard fixes it."""
    selected = CASES["k2_skip_empty_expert"]
    x, weight_leaf, weight, bias, _ = make_inputs(selected, torch.float32)
    plan = plan_dispatch(selected, NUM_EXPERTS)
    rows = grouped_linear(gather_rows(x, plan), weight, plan, bias if with_bias else None, use_grouped_mm)
    rows.sum().backward()

    x64, weight64, bias64 = (t.detach().double().requires_grad_() for t in (x, weight_leaf, bias))
    ref_rows = [
        x64[t] @ weight64[e] + (bias64[e] if with_bias else 0)
        for t, e in zip(plan.token_index.tolist(), plan.expert_index.tolist())
    ]
    torch.stack(ref_rows).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight_leaf.grad.double(), weight64.grad, atol=1e-5, rtol=1e-5)
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), bias64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("hidden", [8, OUT_FEATURES], ids=["gate_on_hidden", "gate_on_output"])
def test_expert_mlp_matches_naive_loop(hidden, with_bias, dtype):
    """`expert_mlp`, the expert FFN of all three architectures: one plan for both projections, the gate on the
    narrower of the hidden (8 < d = 16) and the output (24 > 16); output and every gradient equal a float64 loop."""
    selected = CASES["k2_skip_empty_expert"]
    generator = torch.Generator().manual_seed(3)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()

    x = leaf(selected.shape[0], IN_FEATURES)
    up, down = leaf(NUM_EXPERTS, IN_FEATURES, hidden, scale=IN_FEATURES**-0.5), leaf(NUM_EXPERTS, hidden, IN_FEATURES)
    up_bias, down_bias = (leaf(NUM_EXPERTS, hidden), leaf(NUM_EXPERTS, IN_FEATURES)) if with_bias else (None, None)
    gates = torch.rand(selected.shape, generator=generator).to(dtype).requires_grad_()
    leaves = [t for t in (x, up, down, gates, up_bias, down_bias) if t is not None]

    plan = plan_dispatch(selected, NUM_EXPERTS)
    out = expert_mlp(x, plan, up, down, torch.relu, gates, up_bias, down_bias)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = naive_expert_ffn(*leaves64[:4], selected, *leaves64[4:])
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    tol = TOLERANCE[dtype]
    for index, (actual, expected) in enumerate([(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, leaves64)]):
        scale = expected.abs().max().item() if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol, msg=f"tensor {index}")


def _gathered_linear_case(seed=5):
    """A k=2 dispatch of 8 tokens (SKIP and an empty expert included), with every input a leaf."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, IN_FEATURES, generator=generator).requires_grad_()
    weight = torch.randn(NUM_EXPERTS, IN_FEATURES, OUT_FEATURES, generator=generator).requires_grad_()
    bias = torch.randn(NUM_EXPERTS, OUT_FEATURES, generator=generator).requires_grad_()
    return x, weight, bias, plan_dispatch(CASES["k2_skip_empty_expert"], NUM_EXPERTS)


def _gradients(fn, x, weight, bias):
    out = fn(x, weight, bias)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    return [out, *torch.autograd.grad(out, (x, weight, bias), grad_out)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test through `grouped_mm` (which keeps its whole input) and through the per-expert loop (which keeps
    one slice of it per expert)."""
    import modeling_mom.moe_dispatch as moe_dispatch

    monkeypatch.setattr(moe_dispatch, "grouped_mm_supported", lambda *args: request.param)
    return request.param


def test_gathered_linear_keeps_x_not_its_rows(backend, monkeypatch):
    """`gathered_linear` computes exactly `grouped_linear(gather_rows(x))` (bitwise: the backward pass gathers the same
    rows again), and autograd no longer keeps the gathered `[S, in]` rows, only `x` and the index; without the
    saved-tensors hooks (the rows kept, as before) the rows stay alive until the backward pass."""
    import weakref

    import modeling_mom.moe_dispatch as moe_dispatch

    x, weight, bias, plan = _gathered_linear_case()
    expected = _gradients(lambda *t: grouped_linear(gather_rows(t[0], plan), t[1], plan, t[2]), x, weight, bias)
    for actual, reference in zip(_gradients(lambda *t: gathered_linear(*t[:2], plan, t[2]), x, weight, bias), expected):
        assert torch.equal(actual, reference)

    gathered = []
    original_gather = moe_dispatch.gather_rows
    monkeypatch.setattr(moe_dispatch, "gather_rows", lambda *a: gathered.append(original_gather(*a)) or gathered[-1])
    for regather, kept in ((True, False), (False, True)):
        monkeypatch.setattr(moe_dispatch, "_regather_applies", lambda x, weight, regather=regather: regather)
        out = gathered_linear(x, weight, plan, bias)
        rows = weakref.ref(gathered.pop())
        assert (rows() is not None) == kept
        out.sum().backward()


def test_gathered_linear_nests_inside_other_saved_tensor_hooks(backend):
    """Enclosing saved-tensors hooks see what the dispatch keeps: `x` and the index, no `[S, in]` rows (a counter, as
    `benchmarks.bench_models.activation_bytes` uses); gradients under non-reentrant checkpointing (which refuses a
    second unpacking of what it packed: the loop's slices share one) and under offloading equal the plain ones."""
    x, weight, bias, plan = _gathered_linear_case()
    saved = []

    def count(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        out = gathered_linear(x, weight, plan, bias)
    assert any(t is x for t in saved) and any(t is plan.token_index for t in saved)
    rows_bytes, inputs = plan.token_index.shape[0] * IN_FEATURES * 4, {x.data_ptr(), weight.data_ptr()}
    assert all(t.untyped_storage().nbytes() < rows_bytes for t in saved if t.untyped_storage().data_ptr() not in inputs)
    expected = _gradients(lambda *t: gathered_linear(*t[:2], plan, t[2]), x, weight, bias)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close([x.grad, weight.grad, bias.grad], expected[1:], rtol=0, atol=0)

    def dispatch(x, weight, bias):
        return gathered_linear(x, weight, plan, bias)

    def checkpointed(*t):
        return torch.utils.checkpoint.checkpoint(dispatch, *t, use_reentrant=False)

    def offloaded(*t):
        with torch.autograd.graph.save_on_cpu():
            return dispatch(*t)

    for variant in (checkpointed, offloaded):
        for actual, reference in zip(_gradients(variant, x, weight, bias), expected):
            assert torch.equal(actual, reference)


def test_expert_mlp_keeps_nothing_of_model_width_per_pair(backend):
    """Training memory: of the `[S, ...]` tensors of an expert FFN, autograd keeps only the narrow hidden ones
    (`[S, inner]`), neither the gathered input rows nor the expert outputs (`[S, d]`, which `index_add` would keep),
    whole or in slices; the scatter's index is kept as `[S]`, which offloading hooks copy as it is."""
    x, _, _, plan = _gathered_linear_case()
    up = torch.randn(NUM_EXPERTS, IN_FEATURES, 8, requires_grad=True)
    down = torch.randn(NUM_EXPERTS, 8, IN_FEATURES, requires_grad=True)
    gates = torch.rand(CASES["k2_skip_empty_expert"].shape, requires_grad=True)
    storages, inputs = set(), {t.data_ptr() for t in (x, up, down)}

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in inputs:
            storages.add((tensor.untyped_storage().nbytes(), tensor.is_floating_point(), tensor.dim()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = expert_mlp(x, plan, up, down, torch.relu, gates)
    pairs = plan.token_index.shape[0]
    assert (pairs * 8 * 4, True, 2) in storages  # the hidden
    assert max(size for size, _, _ in storages) < pairs * IN_FEATURES * 4
    assert all(dim == 1 for _, floating, dim in storages if not floating)  # indices as they are: `[S]`
    out.sum().backward()


def test_gathered_linear_is_twice_differentiable():
    """Second-order gradients (a gradient penalty) through the gathered-again rows equal those through kept rows
    (autograd reconnects what a hook unpacks to the graph of the tensor it packed)."""
    x, weight, bias, plan = _gathered_linear_case()

    def penalty_gradients(dispatch):
        grads = torch.autograd.grad(dispatch(x, weight, bias).square().sum(), (x, weight), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (x, weight, bias))

    kept = penalty_gradients(lambda *t: grouped_linear(gather_rows(t[0], plan), t[1], plan, t[2]))
    for actual, expected in zip(penalty_gradients(lambda *t: gathered_linear(*t[:2], plan, t[2])), kept):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_scatter_rows_backward_is_checked_to_second_order():
    """`scatter_rows`' own backward (an `index_select` keeping only the index), gated and not, against finite
    differences in float64, first and second order (gradient penalties differentiate it again)."""
    plan = plan_dispatch(CASES["k2_skip_empty_expert"], NUM_EXPERTS)
    generator = torch.Generator().manual_seed(7)
    y = torch.randn(plan.token_index.shape[0], 3, generator=generator, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(CASES["k2_skip_empty_expert"].shape, generator=generator, dtype=torch.float64)
    gates.requires_grad_()
    tokens = CASES["k2_skip_empty_expert"].shape[0]
    for function, inputs in [(lambda y: scatter_rows(y, plan, tokens), (y,)),
                             (lambda y, g: scatter_rows(y, plan, tokens, gates=g), (y, gates))]:  # fmt: skip
        assert torch.autograd.gradcheck(function, inputs) and torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("changed", ["input", "weight"])
def test_gathered_linear_refuses_tensors_modified_in_place(changed, backend):
    """The backward pass gathers from `x` again, and autograd skips its own in-place check for tensors saved through
    hooks: `x` or a weight changed in place after the forward pass (an optimizer step before `backward`) is an error,
    as it was, not silently wrong gradients."""
    x, weight, bias, plan = _gathered_linear_case()
    source = x * 1.0
    out = gathered_linear(source, weight, plan, bias).square().sum()
    with torch.no_grad():
        (source if changed == "input" else weight).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


def test_gathered_linear_takes_inference_tensors():
    """An input made under `torch.inference_mode` (no version counter) into trainable experts: the rows are kept."""
    _, weight, bias, plan = _gathered_linear_case()
    with torch.inference_mode():
        x = torch.randn(8, IN_FEATURES)
    gathered_linear(x, weight, plan, bias).sum().backward()
    assert weight.grad is not None


def test_the_forced_loop_is_the_loop_without_autograd_too(monkeypatch):
    """`use_grouped_mm=False` is the reference the fast paths are compared with: it takes the per-expert loop even
    where the `embedding_bag` path would run (no autograd, few rows per small expert)."""
    import modeling_mom.moe_dispatch as moe_dispatch

    def refuse(*args, **kwargs):
        raise AssertionError("the bag path ran")

    monkeypatch.setattr(moe_dispatch, "bag_mixture", refuse)
    x, weight = torch.randn(3, IN_FEATURES), torch.randn(NUM_EXPERTS, IN_FEATURES, OUT_FEATURES)
    plan = plan_dispatch(torch.tensor([[0], [1], [2]]), NUM_EXPERTS)
    with torch.no_grad():
        out = grouped_linear(x, weight, plan, use_grouped_mm=False)
        with pytest.raises(AssertionError, match="the bag path ran"):
            grouped_linear(x, weight, plan)  # the automatic choice takes the bag here
    torch.testing.assert_close(out, torch.stack([x[i] @ weight[i] for i in range(3)]))


PREFILL = torch.arange(320).remainder(16).view(160, 2)  # 20 rows per expert: the grouped path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "selected", [[[3, 9], [9, 16]], [[16, 17]], PREFILL.tolist()], ids=["decode", "all_skip", "prefill"]
)
def test_inference_matches_naive_loop(selected, dtype):
    """Without autograd: with at most 6 rows per (small) expert, as in decoding, one `embedding_bag` computes every
    row, with more (a prompt) the grouped matmul does; both equal the loop."""
    num_experts, selected = 16, torch.tensor(selected)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(selected.shape[0], IN_FEATURES, generator=generator).to(dtype)
    weight = torch.randn(num_experts, IN_FEATURES, OUT_FEATURES, generator=generator).to(dtype)
    bias = torch.randn(num_experts, OUT_FEATURES, generator=generator).to(dtype)
    gates = torch.rand(selected.shape, generator=generator).to(dtype)
    with torch.no_grad():
        plan = plan_dispatch(selected, num_experts)
        out = scatter_rows(grouped_linear(gather_rows(x, plan), weight, plan, bias), plan, x.shape[0], gates)
    ref = naive_dispatch(*(t.double() for t in (x, weight, bias)), selected, gates.double(), num_experts)
    scale = ref.abs().max().item() if dtype == torch.bfloat16 else 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol * max(scale, 1e-12), rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_input", [True, False], ids=["one-input-per-row", "one-input-per-choice"])
@pytest.mark.parametrize("num_rows", [5, 1], ids=["one-bag-per-row", "one-bag-per-choice"])
def test_unsorted_bag_mixture_matches_a_loop(num_rows, shared_input, dtype):
    """`bag_mixture`: each row's gate-weighted sum over its chosen experts (repeated choices included), computed
    without a sort, equals the loop over rows and choices; the gate defaults to 1. With fewer rows than threads (one
    row, two threads here) each choice gets its own bag and the row sums them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        check_bag_mixture_against_a_loop(num_rows, shared_input, dtype)
    finally:
        torch.set_num_threads(threads)


def check_bag_mixture_against_a_loop(num_rows, shared_input, dtype):
    k, num_experts = 3, 7
    generator = torch.Generator().manual_seed(0)
    selected = torch.randint(num_experts, (num_rows, k), generator=generator)
    selected[0, 1] = selected[0, 0]
    x = torch.randn(num_rows, 1 if shared_input else k, IN_FEATURES, generator=generator).to(dtype)
    weight = torch.randn(num_experts, IN_FEATURES, OUT_FEATURES, generator=generator).to(dtype)
    gates = torch.rand(num_rows, k, generator=generator).to(dtype)
    for row_gates in (gates, None):
        with torch.no_grad():
            out = bag_mixture(x, selected, weight, row_gates)
        ref = torch.zeros(num_rows, OUT_FEATURES, dtype=torch.float64)
        for n in range(num_rows):
            for j in range(k):
                gate = 1.0 if row_gates is None else row_gates[n, j].double()
                ref[n] += gate * x[n, 0 if shared_input else j].double() @ weight[selected[n, j]].double()
        tol = TOLERANCE[dtype]
        scale = ref.abs().max().item() if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(out.double(), ref, atol=tol * scale, rtol=tol)


def test_plan_sorts_by_expert_and_drops_skip():
    selected = CASES["k2_skip_empty_expert"]
    plan = plan_dispatch(selected, NUM_EXPERTS)
    flat = selected.flatten()
    kept = (flat < NUM_EXPERTS).nonzero().flatten()
    # stable sort of the kept (token, slot) pairs by expert
    expected_order = kept[flat[kept].argsort(stable=True)]
    assert plan.flat_index.tolist() == expected_order.tolist()
    assert plan.token_index.tolist() == (expected_order // selected.shape[1]).tolist()
    assert plan.expert_index.tolist() == flat[expected_order].tolist()
    counts = [int((flat == e).sum()) for e in range(NUM_EXPERTS)]
    assert plan.counts == counts and counts[1] == 0
    assert plan.offsets.dtype == torch.int32
    assert plan.offsets.tolist() == [sum(counts[: e + 1]) for e in range(NUM_EXPERTS)]
    assert plan.num_experts == NUM_EXPERTS


def _graph_node_names(tensor):
    """Names of all autograd nodes reachable from `tensor.grad_fn`."""
    names, stack, seen = [], [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_fallback_unbinds_weight_once_and_never_indexes_it():
    """`weight[e]` in an autograd loop would add one SelectBackward per expert (each building a full-size zero
    gradient in backward, quadratic in E); the fallback must use a single `unbind`."""
    num_experts = 8
    selected = torch.arange(16).remainder(num_experts).view(8, 2)
    x = torch.randn(8, IN_FEATURES, requires_grad=True)
    weight = torch.randn(num_experts, IN_FEATURES, OUT_FEATURES, requires_grad=True)
    plan = plan_dispatch(selected, num_experts)
    rows = grouped_linear(gather_rows(x, plan), weight, plan, use_grouped_mm=False)
    names = _graph_node_names(rows)
    assert names.count("UnbindBackward0") == 1
    assert "SelectBackward0" not in names
    assert names.count("MmBackward0") == num_experts


@pytest.mark.parametrize("out_features", [5, 24])
def test_misaligned_features_run_grouped_mm_on_padded_operands(monkeypatch, out_features):
    """grouped_mm rejects strides that are not multiples of 16 bytes (e.g. 37 features in fp32, as in transformers'
    common-test configs, or MoEUT-44M's 82-wide heads); the automatic choice (`use_grouped_mm=None`) must not
    raise: where the build has grouped_mm it runs on zero-padded operands, else the loop, with the reference's
    values and gradients either way."""
    from modeling_mom import moe_dispatch

    used = []
    padded = moe_dispatch._feature_padded_grouped_mm
    monkeypatch.setattr(moe_dispatch, "_feature_padded_grouped_mm", lambda *args: used.append(1) or padded(*args))
    selected = CASES["k2_skip_empty_expert"]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(selected.shape[0], 37, generator=generator, requires_grad=True)
    weight = torch.randn(NUM_EXPERTS, 37, out_features, generator=generator, requires_grad=True)
    bias = torch.randn(NUM_EXPERTS, out_features, generator=generator, requires_grad=True)
    gates = torch.rand(selected.shape, generator=generator, requires_grad=True)
    assert not grouped_mm_supported(x, weight)
    out = dispatch(x, weight, bias, selected, gates, NUM_EXPERTS, use_grouped_mm=None)
    out.sum().backward()
    assert len(used) == int(grouped_mm_supported(x))

    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias, gates)]
    ref = naive_dispatch(*leaves64[:3], selected, leaves64[3], NUM_EXPERTS)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for leaf, leaf64 in zip((x, weight, bias, gates), leaves64):
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "out_features, rows_per_expert, padded",
    [(24, 64, True), (24, 8, False), (5, 64, False)],
    ids=["input_padded_many_rows", "input_padded_few_rows", "output_padded"],
)
def test_without_autograd_on_cpu_feature_padding_is_taken_where_it_pays(
    monkeypatch, out_features, rows_per_expert, padded
):
    """Without autograd on CPU the padded copy of the weight costs more than the per-expert loop saves, unless only
    the input features are padded and each expert has 64 rows or more (see `_feature_padding_wins`); either way the
    values are the loop's."""
    from modeling_mom import moe_dispatch

    if not grouped_mm_supported(torch.randn(1, IN_FEATURES)):
        pytest.skip("this torch build has no grouped_mm")
    used = []
    real = moe_dispatch._feature_padded_grouped_mm
    monkeypatch.setattr(moe_dispatch, "_feature_padded_grouped_mm", lambda *args: used.append(1) or real(*args))
    rows = NUM_EXPERTS * rows_per_expert
    plan = plan_dispatch((torch.arange(rows) % NUM_EXPERTS).unsqueeze(1), NUM_EXPERTS)
    x, weight = torch.randn(rows, 37), torch.randn(NUM_EXPERTS, 37, out_features)
    with torch.no_grad():
        out = grouped_linear(x, weight, plan)
    assert len(used) == int(padded)
    torch.testing.assert_close(out, grouped_linear(x, weight, plan, use_grouped_mm=False), atol=1e-5, rtol=1e-5)


def test_aligned_features_pick_grouped_mm_where_the_build_has_it():
    x, weight = torch.randn(3, IN_FEATURES), torch.randn(NUM_EXPERTS, IN_FEATURES, OUT_FEATURES)
    assert grouped_mm_supported(x, weight) == grouped_mm_supported(x)
    assert grouped_mm_supported(x, weight.transpose(1, 2).contiguous().transpose(1, 2)) == grouped_mm_supported(x)
    assert not grouped_mm_supported(x.double(), weight.double())


def test_small_bf16_products_take_one_padded_bmm(monkeypatch):
    """bf16 on CPU with small products: one `bmm` over the experts' rows padded to the largest count (a grouped
    matmul, or the loop where features are not aligned for it, pays oneDNN's fixed cost per expert there), with the
    same values and gradients as the float64 reference; not in fp32, not where padding would more than double the
    rows, not for large products, not when the loop is forced."""
    from modeling_mom import moe_dispatch

    used = []
    padded_linear = moe_dispatch._padded_linear
    monkeypatch.setattr(moe_dispatch, "_padded_linear", lambda *args: used.append(1) or padded_linear(*args))
    assert_matches_reference(CASES["k2_skip_empty_expert"], torch.bfloat16, None)
    assert_matches_reference(CASES["k3_repeats"], torch.bfloat16, None, transposed_weight=True)
    assert len(used) == 2
    assert_matches_reference(CASES["k3_repeats"], torch.float32, None)
    skewed = torch.tensor([[0]] * 9 + [[1], [2], [3]])  # 12 rows; padding to expert 0's 9 would make 36
    assert_matches_reference(skewed, torch.bfloat16, None)
    assert_matches_reference(CASES["k3_repeats"], torch.bfloat16, False)
    assert len(used) == 2
    plan = plan_dispatch(CASES["k3_repeats"], NUM_EXPERTS)
    x = torch.randn(15, 12, dtype=torch.bfloat16, requires_grad=True)  # training: not the decoding path
    weight = torch.randn(NUM_EXPERTS, 12, 20, dtype=torch.bfloat16)
    assert not grouped_mm_supported(x, weight)  # 12 and 20 bf16 features: not 16-byte multiples
    out = grouped_linear(x, weight, plan)
    assert len(used) == 3
    loop = grouped_linear(x, weight, plan, use_grouped_mm=False)
    torch.testing.assert_close(out, loop, atol=2e-2, rtol=2e-2)
    plan = plan_dispatch(CASES["k1"], NUM_EXPERTS)
    rows = torch.ones(8, 1, dtype=torch.bfloat16)
    large = torch.ones(1, 1, 1, dtype=torch.bfloat16).expand(NUM_EXPERTS, 2048, 4096)  # 2 rows x 2^23 per expert
    assert moe_dispatch._padded_wins(rows, large[:, :1024], plan) and not moe_dispatch._padded_wins(rows, large, plan)
