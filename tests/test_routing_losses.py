"""Router auxiliary losses (`modeling_mom.routing_losses`) checked by hand: top-K counting, several router calls with
padding, KV-cache masks longer than the logits, and all-padding sequences.

Tolerances: fp32 on CPU; the by-hand references sum the same few numbers in another order, so they agree to float
rounding (~1e-7); `assert_close`'s fp32 defaults (rtol 1.3e-6, atol 1e-5) cover that. Where a result must *differ*
(the wrong mask columns), the differences are above 1e-2, far above rounding.
"""

import math

import pytest
import torch

from modeling_mom.routing_losses import (
    concentration_loss,
    mutual_information_loss,
    router_z_loss,
    sequence_entropy_loss,
    switch_load_balancing_loss,
)


def switch_by_hand(rows: torch.Tensor, k: int) -> torch.Tensor:
    """``C * sum_i f_i * P_i`` over the given (unpadded) rows: f_i the share of the N*K (token, slot) selections that
    chose i, P_i the mean softmax probability of i. Written out per token, independently of the library's code."""
    num_tokens, num_choices = rows.shape
    probs = rows.softmax(-1)
    counts = torch.zeros(num_choices)
    for token in range(num_tokens):
        for choice in probs[token].topk(k).indices.tolist():
            counts[choice] += 1
    fraction = counts / (num_tokens * k)
    return num_choices * (fraction * probs.mean(0)).sum()


def test_switch_loss_with_two_selections_by_hand():
    """K=2: `f` counts every (token, slot) selection and is divided by N*K, so it sums to 1 and uniform routing
    gives exactly 1 (dividing by N alone would double the loss)."""
    # token 0 picks choices 0 and 1, token 1 picks choices 2 and 1: f = [1, 2, 1] / 4
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    probs = logits.softmax(-1)
    fraction = torch.tensor([0.25, 0.5, 0.25])
    expected = 3 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(switch_load_balancing_loss([logits], 2), expected)
    torch.testing.assert_close(switch_by_hand(logits, 2), expected)  # the helper the tests below use agrees
    # uniform logits: P = 1/3 for every choice and f sums to 1 whichever two (tied) choices topk picks
    uniform = switch_load_balancing_loss([torch.zeros(6, 3)], 2)
    torch.testing.assert_close(uniform, torch.tensor(1.0), atol=1e-6, rtol=0)


def test_switch_loss_over_two_router_calls_counts_only_each_calls_real_tokens():
    """Two calls of a router (e.g. two rounds), each `[batch * seq, C]` rows in the same (batch, position) order:
    the padding mask applies to each call's rows alike, so exactly the rows at real positions of both calls count."""
    torch.manual_seed(0)
    batch, seq, num_choices = 2, 3, 4
    calls = [torch.randn(batch * seq, num_choices) * 2 for _ in range(2)]
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])  # left padding: 3 real positions of 6
    real = mask.reshape(-1).bool()
    kept = torch.cat([call[real] for call in calls])  # 6 rows: the 3 real rows of each call
    for k in (1, 2):
        expected = switch_by_hand(kept, k)
        torch.testing.assert_close(switch_load_balancing_loss(calls, k, mask), expected)
        # the padded rows matter: counting every row gives another value
        assert not torch.allclose(switch_by_hand(torch.cat(calls), k), expected, atol=1e-3)


# A KV-cache step: the mask covers 2 past tokens and the 3 new ones (the logits' rows). The past is not all real,
# the new tokens of row 0 start with padding, so the last 3 columns, the first 3 and no mask all differ.
CACHE_MASK = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
NEW = 3


def _router_logits(groups: tuple[int, ...] = ()) -> torch.Tensor:
    """Random logits; rows 0-2 lean to choice 3, so that dropping or keeping any of them moves
    every loss (and the marginal routing distribution) well beyond rounding."""
    torch.manual_seed(0)
    logits = torch.randn(2 * NEW, *groups, 4)
    logits[:3, ..., 3] += 5
    return logits


@pytest.mark.parametrize(
    "loss",
    [
        lambda logits, mask: switch_load_balancing_loss([logits], 1, mask),
        lambda logits, mask: switch_load_balancing_loss([logits, logits[:, [1, 2, 3, 0]]], 2, mask),  # choices permuted
        router_z_loss,
        mutual_information_loss,
        concentration_loss,
    ],
    ids=["switch_k1", "switch_two_calls_k2", "router_z", "mutual_information", "concentration"],
)
def test_a_mask_longer_than_the_logits_uses_its_last_columns(loss):
    """With a KV cache the attention mask spans past and new tokens, the router logits only the new ones: a loss
    must read the mask's last `query_length` columns (the new tokens), not its first."""
    logits = _router_logits()
    result = loss(logits, CACHE_MASK)
    torch.testing.assert_close(result, loss(logits, CACHE_MASK[:, -NEW:]))
    assert not torch.allclose(result, loss(logits, CACHE_MASK[:, :NEW]), atol=1e-3)
    assert not torch.allclose(result, loss(logits, None), atol=1e-3)  # the mask is used at all


def test_sequence_entropy_loss_with_a_mask_longer_than_the_logits_uses_its_last_columns():
    """As above for MoEUT's per-sequence entropy, with two calls of a router with 2 groups (heads)."""
    logits = _router_logits(groups=(2,))
    calls = [logits, logits.roll(1, dims=0)]
    result = sequence_entropy_loss(calls, 2, CACHE_MASK)
    torch.testing.assert_close(result, sequence_entropy_loss(calls, 2, CACHE_MASK[:, -NEW:]))
    assert not torch.allclose(result, sequence_entropy_loss(calls, 2, CACHE_MASK[:, :NEW]), atol=1e-3)
    assert not torch.allclose(result, sequence_entropy_loss(calls, 2, None), atol=1e-3)


def test_sequence_entropy_loss_drops_an_all_padding_sequence():
    """A sequence with no real token (a fully padded row of a batch) has no routing distribution: it is left out of
    the mean, so the loss is finite and equals the loss of the other sequences alone, and its backward is finite
    (log of zero weights would make both NaN), with no gradient reaching the padded row's logits."""
    torch.manual_seed(0)
    batch, seq, groups, num_choices = 3, 4, 2, 5
    calls = [(torch.randn(batch * seq, groups, num_choices) * 2).requires_grad_() for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]])
    loss = sequence_entropy_loss(calls, batch, mask)
    assert torch.isfinite(loss)
    others = [0, 2]
    rows = torch.cat([torch.arange(b * seq, (b + 1) * seq) for b in others])
    alone = sequence_entropy_loss([call.detach()[rows] for call in calls], len(others), mask[others])
    torch.testing.assert_close(loss.detach(), alone)
    assert -math.log(num_choices) <= alone.item() <= 0  # a real (negative) entropy, not 0 from a degenerate mean
    loss.backward()
    for call in calls:
        assert torch.isfinite(call.grad).all()
        assert call.grad[seq : 2 * seq].abs().max() == 0  # the padded sequence's rows
        assert call.grad[rows].abs().max() > 0
