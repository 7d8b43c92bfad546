"""The analytic side of the benchmarks: FLOP counts checked against counts derived by hand (no timing here)."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.bench_dispatch import build_layer
from benchmarks.bench_models import FLOP_FORMULAS, forward_flops_per_token


def test_gpt2_forward_flops_per_token_match_the_hand_count():
    """Per token: 2 x (12 d^2 per layer + the d x vocab head) for the matmuls, and 4 T d per layer for attention's
    scores and mixing (T = the sequence length, counted over the full square as torch does)."""
    layers, d, vocab, seq = 2, 64, 100, 32
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=vocab, n_positions=seq))
    model.set_attn_implementation("sdpa")
    expected = 2 * (layers * 12 * d * d + d * vocab) + layers * 4 * seq * d
    assert forward_flops_per_token(model, torch.randint(vocab, (1, seq))) == expected


@pytest.mark.parametrize("tokens", [2, 8, 128], ids=["unsorted_bags", "embedding_bag", "grouped_mm"])
def test_expert_dispatch_flops_are_the_useful_flops(tokens):
    """One expert FFN costs 2 x 2 x d x e per chosen expert, 4 T k d e in all, whichever path computes it: unsorted
    bags (at most one choice per expert), one weighted `embedding_bag` per projection of the sorted rows (up to 6
    rows per expert, as in decoding) or the grouped matmuls (more rows)."""
    d, num_experts, width, k = 32, 6, 16, 2
    experts = build_layer(d, num_experts, width, k, "relu", torch.float32)
    index = torch.rand(tokens, num_experts).topk(k, dim=-1).indices
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        experts(torch.randn(tokens, d), index, torch.rand(tokens, k))
    assert counter.get_total_flops() == 4 * tokens * k * d * width
    dense = nn.Linear(d, width, bias=False)
    with FlopCounterMode(display=False) as counter:
        dense(torch.randn(tokens, d))
    assert counter.get_total_flops() == 2 * tokens * d * width  # the convention the formulas follow
