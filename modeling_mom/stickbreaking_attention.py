"""Stick-breaking attention (ModuleFormer, Shen et al. 2023; Tan et al. 2024, arXiv 2410.17980), in plain PyTorch.

Query i breaks a unit stick over its keys, nearest first: key j takes the fraction ``beta_ij = sigmoid(q_i . k_j /
sqrt(d))`` of what the nearer keys left over, so

    A_ij = beta_ij * prod_{j < m <= i} (1 - beta_im),        o_i = sum_j A_ij v_j.

Order comes from the mechanism itself, so no position embedding is needed. Two variants:

* official ModuleFormer / MoLM (``attend_current=True, remainder_to_current=False``): keys ``j <= i``, and the part of
  the stick nobody took is dropped (the weights sum to at most 1);
* Tan et al. 2024 (``attend_current=False, remainder_to_current=True``): keys ``j < i``, and the remainder
  ``1 - sum_j A_ij`` goes to the current token's value.

Computed in log space in fp32 (``log A_ij = log sigmoid(l_ij) + sum_{m > j} log sigmoid(-l_im)``, every term <= 0, so
``exp`` cannot overflow), in blocks of query rows whose keys stop at the block's causal limit: memory per block is
O(chunk * keys) and no work is spent on the masked upper triangle. A padding key gets ``beta = 0`` and ``log(1 -
beta) = 0``: it takes nothing and breaks nothing, so left-padded rows give exactly the outputs of unpadded ones.
"""

import torch
import torch.nn.functional as F


def stick_breaking_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attend_current: bool = True,
    remainder_to_current: bool = False,
    chunk_size: int = 128,
    output_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal stick-breaking attention of the last `T` of `S` positions (the first `S - T` are cached history).

    Args:
        query: `[B, H, G, T, D]`; the `G` query groups of a head (MoA: one per selected expert) share its keys.
        key, value: `[B, H, S, D]`.
        key_padding_mask: `[B, S]`, true (or 1) for real tokens; `None` means no padding.
        attend_current: let query i attend to key i (official ModuleFormer) or only to earlier keys.
        remainder_to_current: add `(1 - sum_j A_ij) * v_i` (Tan et al. 2024).
        chunk_size: query rows per block.
        output_weights: also return the attention weights `A`, materialised as `[B, H * G, T, S]` (fp32; query group
            g of head h at index `h * G + g`).

    Returns:
        the output `[B, H, G, T, D]` in `value`'s dtype, and the weights or None.
    """
    seq_len, key_len = query.shape[-2], key.shape[-2]
    offset = key_len - seq_len
    scale = query.shape[-1] ** -0.5
    key = key.unsqueeze(2).float()  # [B, H, 1, S, D]
    value32 = value.unsqueeze(2).float()
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()[:, None, None, None, :]  # [B, 1, 1, 1, S]
    positions = torch.arange(key_len, device=query.device)
    outputs, all_weights = [], []
    for start in range(0, seq_len, chunk_size):
        end = min(start + chunk_size, seq_len)
        visible = offset + end  # keys after the block's last query are never attended to
        query_pos = positions[offset + start : visible, None]  # [t, 1]
        key_pos = positions[None, :visible]  # [1, s]
        allowed = key_pos <= query_pos if attend_current else key_pos < query_pos
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[..., :visible]
        logits = (query[..., start:end, :].float() @ key[..., :visible, :].transpose(-1, -2)) * scale
        log_stay = F.logsigmoid(-logits).masked_fill(~allowed, 0.0)  # log(1 - beta_ij)
        # sum_{m > j} log(1 - beta_im): reverse inclusive cumsum, shifted left by one key (no cancellation)
        log_left = F.pad(log_stay.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
        weights = (F.logsigmoid(logits) + log_left).exp().masked_fill(~allowed, 0.0)  # [B, H, G, t, s]
        if output_weights:
            all_weights.append(F.pad(weights, (0, key_len - visible)))
        else:
            outputs.append(
                _combine(
                    weights, value32[..., :visible, :], value32[..., offset + start : visible, :], remainder_to_current
                )
            )
    if not output_weights:
        return torch.cat(outputs, dim=-2).to(value.dtype), None
    # the output is computed from the returned weights, so that gradients reach them (e.g. `retain_grad`)
    weights = torch.cat(all_weights, dim=-2).flatten(1, 2)  # [B, H * G, T, S]
    out = _combine(weights.view(*query.shape[:-1], key_len), value32, value32[..., offset:, :], remainder_to_current)
    return out.to(value.dtype), weights


def _combine(weights, values, current_values, remainder_to_current):
    """`sum_j A_ij v_j`, plus the stick's remainder times the current token's value if asked."""
    out = weights @ values
    if remainder_to_current:
        out = out + (1.0 - weights.sum(-1, keepdim=True)) * current_values
    return out
