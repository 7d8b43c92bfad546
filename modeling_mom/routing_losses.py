"""Router auxiliary losses shared by the architectures of this package."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` raised to fp32 if it is of lower precision (bf16, fp16); float64 stays float64 (`.float()` would round it,
    which breaks `gradcheck` of a float64 model). Router logits and their losses are computed this way."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
    logits = torch.cat([at_least_float32(logit) for logit in router_logits])
    num_choices = logits.shape[-1]
    probs = F.softmax(logits, dim=-1)
    selected = probs.topk(num_selected, dim=-1).indices
    weights = _token_weights(attention_mask, router_logits[0].shape[0], len(router_logits), logits.device)
    chosen = torch.zeros_like(probs).scatter_(1, selected, 1.0)
    denom = weights.sum().clamp(min=1.0)
    fraction = (chosen * weights[:, None]).sum(0) / (denom * num_selected)
    mean_prob = (probs * weights[:, None]).sum(0) / denom
    return num_choices * (fraction * mean_prob).sum()


def _router_statistics(router_logits: torch.Tensor, attention_mask: torch.Tensor | None):
    """Routing log-probabilities `[N, C]` (fp32), token weights `[N, 1]` (0 = padding) and their sum (>= 1)."""
    log_probs = F.log_softmax(at_least_float32(router_logits), dim=-1)
    weights = _token_weights(attention_mask, router_logits.shape[0], 1, log_probs.device)[:, None]
    return log_probs, weights, weights.sum().clamp(min=1.0)


def mutual_information_loss(
    router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """ModuleFormer's loss for one router: ``H(e|x) - H(e)``, minus the mutual information of tokens and experts.

    ``H(e|x)`` is the mean entropy of each token's routing distribution (low: confident routing) and ``H(e)`` the
    entropy of the batch's mean routing distribution (high: balanced usage), both over non-padding tokens (the
    official code also counts padding). Ranges over ``[-log C, 0]``.

    Args:
        router_logits: `[batch * seq, C]` logits of one router call.
        attention_mask: `[batch, seq]` (or longer, with a KV cache) padding mask.
    """
    log_probs, weights, num_tokens = _router_statistics(router_logits, attention_mask)
    probs = log_probs.exp()
    conditional_entropy = -(probs * log_probs * weights).sum() / num_tokens
    marginal = (probs * weights).sum(0) / num_tokens
    marginal_entropy = -(marginal * (marginal + eps).log()).sum()
    return conditional_entropy - marginal_entropy


def router_z_loss(router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss for one router: mean over non-padding tokens of ``logsumexp(logits)^2``."""
    logits = at_least_float32(router_logits)
    weights = _token_weights(attention_mask, logits.shape[0], 1, logits.device)
    return (logits.logsumexp(-1).square() * weights).sum() / weights.sum().clamp(min=1.0)


def concentration_loss(
    router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Load concentration for one router: ``H(e)``, the entropy of the batch's mean routing distribution.

    Minimising it makes a fine-tuning task use few experts, so that the others can be pruned (ModuleFormer's "load
    concentration loss"). The formula is our reconstruction: the released ModuleFormer code does not contain this
    loss and the paper's exact definition could not be checked.
    """
    log_probs, weights, num_tokens = _router_statistics(router_logits, attention_mask)
    marginal = (log_probs.exp() * weights).sum(0) / num_tokens
    return -(marginal * (marginal + eps).log()).sum()


def sequence_entropy_loss(
    router_logits: Sequence[torch.Tensor], batch_size: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MoEUT's balancing regulariser for one router: ``-H(p_b)``, averaged over sequences b (and router groups).

    ``p_b`` is sequence b's routing distribution ``softmax(logits)`` averaged over its non-padding positions *and*
    over all the given calls of the router (a shared layer's repeats), as in the official MoEUT code (which also
    counts padding). Ranges over ``[-log C, 0]``; minimising it spreads each sequence over all C choices.

    Args:
        router_logits: one `[batch * seq, *groups, C]` tensor per call of the router (e.g. `groups` = heads).
        batch_size: the batch of the calls, to split their rows into sequences.
        attention_mask: `[batch, seq]` (or longer, with a KV cache) padding mask.
    """
    num_calls = len(router_logits)
    log_probs = torch.stack([F.log_softmax(at_least_float32(logit), dim=-1) for logit in router_logits], dim=1)
    log_probs = log_probs.unflatten(0, (batch_size, -1)).flatten(1, 2)  # [B, seq * calls, *groups, C]
    seq = log_probs.shape[1] // num_calls
    if attention_mask is None:  # weights in the logits' precision (at least fp32): float64 models stay float64
        weights = torch.ones(batch_size, seq, device=log_probs.device, dtype=log_probs.dtype)
    else:
        weights = attention_mask[:, -seq:].to(device=log_probs.device, dtype=log_probs.dtype)
    has_tokens = weights.sum(1) > 0  # an all-padding row is treated as unpadded here and dropped from the mean
    weights = torch.where(has_tokens[:, None], weights, 1.0).repeat_interleave(num_calls, dim=1)
    extra = (1,) * (log_probs.dim() - 2)  # broadcast over groups and choices
    mean_log_probs = (log_probs + weights.log().view(*weights.shape, *extra)).logsumexp(1)
    mean_log_probs = mean_log_probs - weights.sum(1).log().view(-1, *extra)  # [B, *groups, C]
    neg_entropy = (mean_log_probs.exp() * mean_log_probs).sum(-1)  # [B, *groups]
    row_weights = has_tokens.to(log_probs.dtype).view(-1, *extra[1:]).expand_as(neg_entropy)
    return (neg_entropy * row_weights).sum() / row_weights.sum().clamp(min=1.0)
