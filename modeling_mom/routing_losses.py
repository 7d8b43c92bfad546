"""Router auxiliary losses shared by the architectures of this package."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _token_weights(attention_mask: torch.Tensor | None, rows_per_call: int, num_calls: int, device) -> torch.Tensor:
    """`[num_calls * rows_per_call]` weights: 1 for real tokens, 0 for padding (all ones without a mask).

    Router rows are `batch * query_length` per call; with a KV cache the mask also covers past tokens, so only its
    last `query_length` columns belong to this call.
    """
    if attention_mask is None:
        return torch.ones(rows_per_call * num_calls, device=device)
    batch = attention_mask.shape[0]
    mask = attention_mask[:, -(rows_per_call // batch) :].reshape(-1).to(device=device, dtype=torch.float32)
    return mask.repeat(num_calls)


def switch_load_balancing_loss(
    router_logits: Sequence[torch.Tensor], num_selected: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load balancing, ``C * sum_i f_i * P_i``, pooled over all given router calls.

    ``f_i`` is the fraction of the top-``num_selected`` selections that went to choice ``i`` and ``P_i`` the mean
    routing probability of ``i`` (``softmax`` of the logits), both over non-padding tokens. ``f`` sums to 1 whatever
    ``num_selected`` is, so the loss is 1 for perfectly uniform routing. Unlike the MoM authors' code, the softmax
    is applied once to logits (not a second time to probabilities) and all K selections are counted.

    Args:
        router_logits: one `[batch * seq, C]` tensor per router call, all with the same `C`.
        num_selected: selections per token (K).
        attention_mask: `[batch, seq]` (or longer, with a KV cache) padding mask.
    """
    logits = torch.cat([logit.float() for logit in router_logits])
    num_choices = logits.shape[-1]
    probs = F.softmax(logits, dim=-1)
    selected = probs.topk(num_selected, dim=-1).indices
    weights = _token_weights(attention_mask, router_logits[0].shape[0], len(router_logits), logits.device)
    chosen = torch.zeros_like(probs).scatter_(1, selected, 1.0)
    denom = weights.sum().clamp(min=1.0)
    fraction = (chosen * weights[:, None]).sum(0) / (denom * num_selected)
    mean_prob = (probs * weights[:, None]).sum(0) / denom
    return num_choices * (fraction * mean_prob).sum()
