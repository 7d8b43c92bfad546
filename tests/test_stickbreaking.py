"""Stick-breaking attention kernel against the stick-breaking process itself.

Tolerances: fp32 kernels against the float64 naive process at 1e-5 (a few dozen fp32 terms accumulate ~1e-6 of
rounding); the float64 kernel against autograd's numerical gradients (`gradcheck` defaults, ~1e-6); two fp32
computations of the same function in different block orders at 1e-5; bf16 inputs against the fp32 kernel on
bf16-rounded inputs at 1e-2 (only the output's final rounding to bf16, 2^-8 relative, differs).
"""

import math

import pytest
import torch

from modeling_mom import stickbreaking_attention as sb
from modeling_mom.stickbreaking_attention import stick_breaking_attention

ATOL = 1e-5
VARIANTS = {"official": (True, False), "tan2024": (False, True)}


def naive_stick_breaking(q, k, v, real=None, attend_current=True, remainder_to_current=False):
    """The stick-breaking process itself, key by key from the nearest, in float64. q `[B,H,G,T,D]`, k/v `[B,H,S,D]`."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, groups, seq, dim = q.shape
    key_len = k.shape[2]
    real = torch.ones(batch, key_len, dtype=torch.bool) if real is None else real.bool()
    beta = torch.sigmoid(torch.einsum("bhgtd,bhsd->bhgts", q, k) / math.sqrt(dim))
    out = torch.zeros_like(q)
    for t in range(seq):
        pos = key_len - seq + t
        stick = torch.ones(batch, heads, groups, 1, dtype=torch.float64)
        first = pos if attend_current else pos - 1
        for j in range(first, -1, -1):
            b = beta[:, :, :, t, j, None] * real[:, j, None, None, None]
            out[:, :, :, t] += stick * b * v[:, :, None, j]
            stick = stick * (1 - b)
        if remainder_to_current:
            out[:, :, :, t] += stick * v[:, :, None, pos]
    return out


def random_inputs(batch=2, heads=2, groups=3, seq=7, past=0, dim=4, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, groups, seq, dim, generator=generator, dtype=dtype) * 2  # wide range of beta
    k, v = (torch.randn(batch, heads, past + seq, dim, generator=generator, dtype=dtype) for _ in range(2))
    real = torch.ones(batch, past + seq, dtype=torch.bool)
    real[1, :3] = False  # left padding: the first queries of row 1 see no real key at all
    real[0, 5] = False  # a hole
    return [x.requires_grad_() for x in (q, k, v)], real


@pytest.mark.parametrize("output_weights", [False, True], ids=["fast", "with_weights"])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("past", [0, 4], ids=["no_cache", "with_cache"])
@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_matches_naive_process_forward_and_backward(variant, past, output_weights, recompute):
    attend_current, remainder = variant
    (q, k, v), real = random_inputs(past=past)
    out, weights = stick_breaking_attention(
        q, k, v, real, attend_current, remainder, 3, output_weights, recompute_weights=recompute
    )
    ref = naive_stick_breaking(q, k, v, real, attend_current, remainder)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)
    grad_out = torch.randn_like(out)
    fast = torch.autograd.grad(out, (q, k, v), grad_out)
    slow = torch.autograd.grad(ref, (q, k, v), grad_out.double())  # through the naive process's own graph
    for name, a, b in zip("qkv", fast, slow):
        torch.testing.assert_close(a, b.float(), atol=ATOL, rtol=0, msg=lambda m: f"grad {name}: {m}")
    assert (weights is None) != output_weights


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_returned_weights_are_those_of_the_output(variant):
    attend_current, remainder = variant
    (q, k, v), real = random_inputs(past=2)
    out, weights = stick_breaking_attention(q, k, v, real, attend_current, remainder, output_weights=True)
    assert weights.shape == (2, 2 * 3, 7, 9)
    assert weights.min() >= 0 and weights.sum(-1).max() <= 1 + 1e-6  # the stick is never over-spent
    combined = weights.view(2, 2, 3, 7, 9) @ v.unsqueeze(2)
    if remainder:
        combined = combined + (1 - weights.view(2, 2, 3, 7, 9).sum(-1, keepdim=True)) * v[:, :, None, 2:]
    torch.testing.assert_close(combined, out, atol=ATOL, rtol=0)
    weights.retain_grad()
    out.sum().backward()
    assert weights.grad is not None


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_float64_gradients_pass_gradcheck(variant):
    """In float64 the kernel computes in float64, so autograd's finite differences check the hand-written backward."""
    (q, k, v), real = random_inputs(batch=2, heads=1, groups=2, seq=5, past=2, dim=3, dtype=torch.float64)

    def attention(q, k, v):
        return stick_breaking_attention(q, k, v, real, *variant, chunk_size=2)[0]

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_blocking_is_transparent(monkeypatch):
    """Blocks of any size, capped by `chunk_size` or by the element budget, give the same result."""
    (q, k, v), real = random_inputs(seq=11, past=3)
    grad_out = torch.randn(2, 2, 3, 11, 4)

    def run(chunk_size):
        out, _ = stick_breaking_attention(q, k, v, real, chunk_size=chunk_size)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    expected = run(128)  # one block
    for got in (run(1), run(4)):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    monkeypatch.setattr(sb, "BLOCK_ELEMENTS", 2 * 3 * 2 * 14 * 2)  # two positions per block whatever chunk_size
    inputs = sb._Inputs(q, k, v, None, attend_current=True, chunk_size=128)
    assert [end - start for start, end, _ in inputs.blocks()] == [2] * 5 + [1]
    for a, b in zip(run(128), expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("output_weights", [False, True], ids=["fast", "with_weights"])
def test_left_padding_is_transparent(output_weights):
    """Padding keys with arbitrary (huge) values change nothing for the real positions, in outputs and gradients."""
    (q, k, v), _ = random_inputs(seq=9)
    full, _ = stick_breaking_attention(q, k, v, output_weights=output_weights)

    def pad(x, dim):
        return torch.cat([torch.randn_like(x.narrow(dim, 0, 3)) * 100, x], dim)

    real = torch.tensor([[False] * 3 + [True] * 9] * 2)
    padded, _ = stick_breaking_attention(pad(q, 3), pad(k, 2), pad(v, 2), real, chunk_size=4,
                                         output_weights=output_weights)  # fmt: skip
    torch.testing.assert_close(padded[..., 3:, :], full, atol=ATOL, rtol=0)
    grads = torch.autograd.grad(padded[..., 3:, :].sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(full.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_decoding_with_a_cache_equals_the_full_sequence(variant):
    """Query lengths 1 and 3 over cached keys give the last rows of the full computation."""
    (q, k, v), real = random_inputs(seq=12)
    with torch.no_grad():
        full, _ = stick_breaking_attention(q, k, v, real, *variant)
        steps, end = [], 5
        for length in (1, 3, 1, 1, 2):
            s = slice(end, end + length)
            steps.append(stick_breaking_attention(q[..., s, :], k[:, :, : s.stop], v[:, :, : s.stop],
                                                  real[:, : s.stop], *variant)[0])  # fmt: skip
            end += length
    torch.testing.assert_close(torch.cat(steps, dim=-2), full[..., 5:end, :], atol=ATOL, rtol=0)


def test_bf16_inputs_are_computed_in_fp32():
    (q, k, v), real = random_inputs(dtype=torch.bfloat16)
    out, _ = stick_breaking_attention(q, k, v, real, chunk_size=3)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    expected, _ = stick_breaking_attention(q32, k32, v32, real, chunk_size=3)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    for g, x in zip(grads, torch.autograd.grad(expected, (q32, k32, v32), torch.ones_like(expected))):
        torch.testing.assert_close(g.float(), x, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("output_weights", [False, True])
def test_autocast_does_not_lower_the_precision(output_weights):
    """Under bf16 autocast (the Trainer's `bf16=True`) the kernel still computes in fp32, forward and backward, so
    its gradients are those of the output it returned (the forward's matmuls used to run in bf16). The kernel's own
    backward also stays fp32 if called under autocast; the inspection path (`output_weights`) is plain autograd,
    whose backward follows the caller's autocast state, so it is differentiated outside, as autocast recommends."""
    (q, k, v), real = random_inputs()
    expected, _ = stick_breaking_attention(q, k, v, real, chunk_size=3, output_weights=output_weights)
    expected_grads = torch.autograd.grad(expected, (q, k, v), torch.ones_like(expected))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = stick_breaking_attention(q, k, v, real, chunk_size=3, output_weights=output_weights)
        if not output_weights:
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    if output_weights:
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    for g, x in zip(grads, expected_grads):
        torch.testing.assert_close(g, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_backward_memory(recompute):
    """Autograd keeps the inputs and, unless the weights are recomputed, each block's `beta` and weights over its
    visible keys (O(T * S): 8 blocks of 8 queries, block b seeing 8 * (b + 1) keys); nothing without gradients."""
    (q, k, v), real = random_inputs(seq=64, past=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        stick_breaking_attention(q, k, v, real, chunk_size=8, recompute_weights=recompute)
    inputs = q.numel() + k.numel() + v.numel() + real.numel()
    rows = q.shape[0] * q.shape[1] * q.shape[2] * 8
    kept = 0 if recompute else sum(2 * rows * 8 * (block + 1) + rows for block in range(8))  # + the stick column
    assert sum(x.untyped_storage().nbytes() // x.element_size() for x in saved) == inputs + kept
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        stick_breaking_attention(q, k, v, real, chunk_size=8)
    assert not saved


def test_bad_inputs_are_rejected():
    (q, k, v), real = random_inputs()
    with pytest.raises(ValueError, match="query"):
        stick_breaking_attention(q[0], k, v)
    with pytest.raises(ValueError, match="S >= T"):
        stick_breaking_attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="key_padding_mask"):
        stick_breaking_attention(q, k, v, real[:, :3])
    with pytest.raises(ValueError, match="chunk_size=0"):
        stick_breaking_attention(q, k, v, chunk_size=0)


def test_weights_too_small_to_matter_are_zero_not_subnormal():
    """Far weights of long rows fall into fp32's subnormal range, which slowed every product on an Intel Xeon 2x."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1, 64, 8, generator=generator) * 4 for _ in range(2))
    k = k[:, :, 0]
    _, weights = stick_breaking_attention(q, k, k, output_weights=True)
    inputs = sb._Inputs(q, k, k, None, True, 64)
    _, block_weights = sb._block_weights(inputs, inputs.block_query(0, 64), 0, 64, 64)
    for w in (weights, block_weights):
        assert (w == 0).any() and not ((w > 0) & (w < sb.WEIGHT_FLOOR)).any()


@pytest.mark.parametrize("output_weights", [False, True], ids=["fast", "with_weights"])
@pytest.mark.parametrize("shape", [(0, 2, 1, 5), (1, 0, 1, 5), (1, 2, 0, 5), (1, 2, 1, 0)],
                         ids=["no_batch", "no_heads", "no_groups", "no_positions"])
def test_nothing_to_attend_gives_empty_outputs(shape, output_weights):
    """An empty batch (or no heads, query groups or new positions) divided by zero when sizing blocks."""
    batch, heads, groups, seq = shape
    q = torch.randn(batch, heads, groups, seq, 4, requires_grad=True)
    k, v = (torch.randn(batch, heads, 3 + seq, 4, requires_grad=True) for _ in range(2))
    out, weights = stick_breaking_attention(q, k, v, output_weights=output_weights)
    assert out.shape == q.shape
    if output_weights:
        assert weights.shape == (batch, heads * groups, seq, 3 + seq)
    out.sum().backward()
    assert q.grad.shape == q.shape
