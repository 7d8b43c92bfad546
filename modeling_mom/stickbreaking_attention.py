"""Stick-breaking attention (ModuleFormer, Shen et al. 2023; Tan et al. 2024, arXiv 2410.17980), in plain PyTorch.

Query i breaks a unit stick over its keys, nearest first: key j takes the fraction ``beta_ij = sigmoid(l_ij)``,
``l_ij = q_i . k_j / sqrt(d)``, of what the nearer keys left over, so

    A_ij = beta_ij * prod_{j < m <= i} (1 - beta_im),        o_i = sum_j A_ij v_j.

Order comes from the mechanism itself, so no position embedding is needed. Two variants:

* official ModuleFormer / MoLM (``attend_current=True, remainder_to_current=False``): keys ``j <= i``, and the part of
  the stick nobody took is dropped (the weights sum to at most 1);
* Tan et al. 2024 (``attend_current=False, remainder_to_current=True``): keys ``j < i``, and the remainder
  ``1 - sum_j A_ij`` goes to the current token's value.

Computed in fp32 as ``A_ij = beta_ij * L_ij``, with ``L_ij = prod_{j < m <= i} (1 - beta_im)`` (the stick the nearer
keys left over) an exclusive cumulative product over keys, nearest first. Every factor lies in [0, 1], so nothing can
overflow, at a third of the elementwise passes of the log-space form ``log A_ij = log beta_ij + sum log(1 - beta_im)``
(no ``log``, whose CPU kernels are slow, and one ``exp``, inside ``sigmoid``). A weight below ``WEIGHT_FLOOR`` (1e-30)
is set to 0: that small, it changes no fp32 output (whose error is ~1e-7), but the far weights of long rows, and the
gradients ``dL/dA * A`` they scale, would otherwise reach fp32's subnormal range (below 1.2e-38), which slows every
product they enter 2-4x on CPUs that handle subnormals in microcode (an Intel Xeon, at 1024 tokens, forward and
backward: 4.1x SDPA's time without the floor, 2.0-2.1x with it). ``1 - beta`` carries fp32's absolute rounding (~6e-8),
so the weights are exact to ~1e-7 absolute. A key that may not be attended to (after the query, or padding) gets
``l = -inf``: then ``beta = 0`` and ``1 - beta = 1`` exactly, it takes nothing and breaks nothing, so left-padded rows
give exactly the outputs of unpadded ones.

The kernel works on blocks of query rows, each against the keys up to its causal limit (no work on the masked upper
triangle, temporaries O(rows * keys)). For the backward pass it keeps each block's ``beta`` and weights, two fp32
values per visible (query, key) pair, so training memory is O(T * S), as for eager attention's probabilities; with
``recompute_weights=True`` it keeps nothing and recomputes them, like FlashAttention, for O(T * D) memory at ~1.3x
the forward + backward time (the cumulative product is a slow scalar kernel on CPU). With ``G = dL/dA * A`` the
gradient of the logits is

    dL/dl_ij = G_ij - beta_ij * sum_{j' <= j} G_ij'          (a forward cumulative sum over keys).

On CUDA with Triton, a fused kernel (`triton_kernels.triton_stick_breaking`, in log space, FlashAttention style)
computes the same attention instead, storing nothing of size T x S.
"""

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .moe_dispatch import triton_usable

# Query rows of one block are capped so that a block's `[batch * heads, rows, keys]` temporaries hold about this many
# fp32 elements (16 MB): the backward keeps four of them alive; much larger ones page-fault, much smaller ones make
# small, inefficient matmuls (measured: 2^20 to 2^22 are equally fast at 2048 tokens, 2^18 is 2x slower).
BLOCK_ELEMENTS = 1 << 22
WEIGHT_FLOOR = 1e-30  # smaller weights are set to 0 (module docstring)


def stick_breaking_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attend_current: bool = True,
    remainder_to_current: bool = False,
    chunk_size: int = 128,
    output_weights: bool = False,
    recompute_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal stick-breaking attention of the last `T` of `S` positions (the first `S - T` are cached history).

    Args:
        query: `[B, H, G, T, D]`; the `G` query groups of a head (MoA: one per selected expert) share its keys.
        key, value: `[B, H, S, D]`, `S >= T`.
        key_padding_mask: `[B, S]`, true (or 1) for real tokens; `None` means no padding.
        attend_current: let query i attend to key i (official ModuleFormer) or only to earlier keys.
        remainder_to_current: add `(1 - sum_j A_ij) * v_i` (Tan et al. 2024).
        chunk_size: the most query positions per block (memory O(chunk * keys); fewer when batch * heads is large).
        output_weights: also return the attention weights `A`, materialised as `[B, H * G, T, S]` (fp32; query group
            g of head h at index `h * G + g`).
        recompute_weights: when gradients are needed, recompute each block's weights in the backward pass instead
            of keeping them from the forward pass: training memory O(T * D) instead of O(T * S) (two fp32 values
            per visible (query, key) pair, like the probabilities eager attention keeps), at about 1.3x the
            forward + backward time.

    Returns:
        the output `[B, H, G, T, D]` in `value`'s dtype, and the weights or None.
    """
    _check_inputs(query, key, value, key_padding_mask, chunk_size)
    if query.numel() == 0:  # nothing attends (an empty batch, no heads or groups, no new positions)
        weights_shape = (query.shape[0], query.shape[1] * query.shape[2], query.shape[3], key.shape[2])
        weights = query.new_zeros(weights_shape, dtype=torch.promote_types(query.dtype, torch.float32))
        return query.to(value.dtype) * 0, weights if output_weights else None  # (still a function of the query)
    padding = None if key_padding_mask is None else ~key_padding_mask.bool()
    if not output_weights and _triton_wins(query, key, value):
        return _triton_attention(query, key, value, padding, attend_current, remainder_to_current), None
    with torch.autocast(query.device.type, enabled=False):  # fp32 under autocast too, as the backward computes
        args = (query, key, value, padding, attend_current, remainder_to_current, chunk_size)
        if output_weights:
            return _attention_with_weights(*args)
        if torch.compiler.is_compiling():  # the blocked kernel writes into views of its scratch, which tracing
            return _attention_with_weights(*args)[0], None  # cannot follow; this form stores the T x S weights
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return _StickBreakingAttention.apply(*args, needs_grad and not recompute_weights), None


def _triton_wins(query, key, value) -> bool:
    """Whether the fused Triton kernel runs (on CUDA, see `moe_dispatch.triton_usable`): it never stores the T x S
    weights, so `recompute_weights` and `chunk_size` do not apply; under autocast it computes in the autocast dtype."""
    if not triton_usable(query):
        return False
    from .triton_kernels import kernel_works  # imported only where Triton is installed

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    same_dtype = query.dtype == key.dtype == value.dtype
    return same_dtype and kernel_works("stick_breaking", query.device, dtype, query.shape[-1])


def _triton_attention(query, key, value, padding, attend_current, remainder_to_current):
    """The fused kernel's output, with Tan et al.'s remainder `(1 - sum_j A_ij) v_i` added from its row sums."""
    from .triton_kernels import triton_stick_breaking

    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out, rowsum = triton_stick_breaking(query, key, value, padding, attend_current)
    if remainder_to_current:  # each query's own value: positions S - T to S - 1, shared by the groups
        own = value[:, :, None, key.shape[2] - query.shape[3] :]
        out = out + (1.0 - rowsum).unsqueeze(-1).to(out.dtype) * own
    return out


def _check_inputs(query, key, value, key_padding_mask, chunk_size):
    if query.dim() != 5 or key.dim() != 4 or key.shape != value.shape:
        raise ValueError(
            f"stick_breaking_attention needs query [B, H, G, T, D] and key, value [B, H, S, D]; got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}."
        )
    batch, heads, _, seq_len, dim = query.shape
    key_len = key.shape[2]
    if key.shape[:2] != (batch, heads) or key.shape[3] != dim or key_len < seq_len:
        raise ValueError(
            f"key/value {tuple(key.shape)} do not fit query {tuple(query.shape)}: they need the same batch, heads and "
            f"head size, and at least as many positions (S >= T, the first S - T being cached history)."
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, key_len):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected {(batch, key_len)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of query rows.")


class _Inputs:
    """The operands, flattened for batched matmuls, and the masks, shared by the forward and backward passes.

    Query rows of a block are ordered (group, position): `[B * H, G * t, D]`, all against the same keys. Keys and
    values are stored in reverse order, nearest first (`[B * H, S, D]`, row `S - 1 - j` holds key j): the keys a
    block sees are then the rows `S - visible:` and the products over nearer keys of the module docstring are plain
    `cumprod`s (no flips of `[rows, keys]` tensors). The query is pre-scaled by `1 / sqrt(D)`. Computed in fp32
    (fp64 inputs stay fp64, e.g. for gradcheck).

    A block's `[B * H, G * t, keys]` temporaries are views of scratch buffers sized for the largest block, so that
    their memory is allocated (and its pages faulted in) once per call, not once per block.
    """

    def __init__(self, query, key, value, padding, attend_current, chunk_size):
        self.batch, self.heads, self.groups, self.seq_len, self.dim = query.shape
        self.key_len = key.shape[2]
        self.offset = self.key_len - self.seq_len
        dtype = torch.promote_types(query.dtype, torch.float32)
        self.query = query.to(dtype) * self.dim**-0.5  # [B, H, G, T, D]
        self.key = key.to(dtype).flip(2).reshape(-1, self.key_len, self.dim)  # [B * H, S, D], nearest first
        self.value = value.to(dtype).flip(2).reshape(-1, self.key_len, self.dim)
        self.padding = None if padding is None else padding.flip(1)[:, None, :]  # [B, 1, S], true for padding
        self.attend_current = attend_current
        rows_per_position = self.batch * self.heads * self.groups  # a block holds at most BLOCK_ELEMENTS logits
        self.step = max(1, min(chunk_size, self.seq_len, BLOCK_ELEMENTS // (rows_per_position * self.key_len)))
        self._scratch = {}

    def blocks(self):
        """`(start, end, visible)` per block of query positions; keys at `visible` and later are after every query in
        the block."""
        for start in range(0, self.seq_len, self.step):
            end = min(start + self.step, self.seq_len)
            yield start, end, self.offset + end

    def scratch(self, name, *shape):
        """A `shape` view of scratch buffer `name`; each name holds one block's temporary at a time."""
        if name not in self._scratch:
            most = self.batch * self.heads * self.groups * self.step * (self.key_len + 1)
            self._scratch[name] = self.query.new_empty(most)
        return self._scratch[name][: math.prod(shape)].view(shape)

    def block_query(self, start, end):
        return self.query[..., start:end, :].reshape(-1, self.groups * (end - start), self.dim)

    def own_rows(self, start, end):
        """The rows of the block's own positions in the reversed keys and values (last position first)."""
        return slice(self.key_len - self.offset - end, self.key_len - self.offset - start)

    def own_values(self, start, end):
        """The values of the block's own positions, one per query row: `[B * H, G * t, D]`."""
        own = self.value[:, self.own_rows(start, end)].flip(1)  # [B * H, t, D] in position order
        return own[:, None].expand(-1, self.groups, -1, -1).reshape(-1, self.groups * (end - start), self.dim)

    def logits(self, query, start, end, visible, out=None):
        """`[B * H, G * t, s]` logits of a block over its keys, nearest first, into `out` if given; keys that may not
        be attended to are -inf."""
        logits = torch.bmm(query, self.key[:, self.key_len - visible :].transpose(1, 2), out=out)
        t = end - start
        # the block's own positions (the first t columns, last position first) are the only place the causal limit
        # cuts: query i may see own position u = t - 1 - column when u <= i (u < i without attend_current)
        row = torch.arange(t, device=logits.device)[:, None]
        own = t - 1 - torch.arange(t, device=logits.device)[None, :]
        after = own > row if self.attend_current else own >= row
        logits.view(-1, self.groups, t, visible)[..., :t].masked_fill_(after, float("-inf"))
        if self.padding is not None:
            padding = self.padding[..., self.key_len - visible :]
            logits.view(self.batch, -1, visible).masked_fill_(padding, float("-inf"))
        return logits


def _weights_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """`A_j = beta_j * prod_{m < j} (1 - beta_m)` for logits over keys nearest first: the formula of the module
    docstring. Plain ops, so that autograd can follow them."""
    beta = torch.sigmoid(logits)
    weights = beta * F.pad((1.0 - beta[..., :-1]).cumprod(-1), (1, 0), value=1.0)
    return F.threshold(weights, WEIGHT_FLOOR, 0.0)


def _block_weights(inputs: _Inputs, query, start, end, visible, keep=False):
    """The block's fractions `beta` (reused by the backward pass) and weights `A`, keys nearest first, in scratch
    (or, with `keep`, in new tensors that the backward pass can reuse)."""
    rows = query.shape[:2]
    new = (lambda name, *shape: query.new_empty(shape)) if keep else inputs.scratch
    beta = inputs.logits(query, start, end, visible, out=new("beta", *rows, visible)).sigmoid_()
    left = new("weights", *rows, visible + 1)  # column j + 1: the stick left after key j
    left[..., 0] = 1.0
    torch.sub(beta.new_ones(()), beta, out=left[..., 1:]).cumprod_(-1)
    weights = left[..., :visible].mul_(beta)
    return beta, F.threshold_(weights, WEIGHT_FLOOR, 0.0)


class _StickBreakingAttention(torch.autograd.Function):
    """Block-wise forward; the backward pass reuses each block's `beta` and weights kept by the forward pass (`keep`),
    or recomputes them (nothing of size T x S is stored)."""

    @staticmethod
    def forward(ctx, query, key, value, padding, attend_current, remainder_to_current, chunk_size, keep):
        inputs = _Inputs(query, key, value, padding, attend_current, chunk_size)
        out = torch.empty_like(inputs.query)  # [B, H, G, T, D]
        kept = []
        for start, end, visible in inputs.blocks():
            beta, weights = _block_weights(inputs, inputs.block_query(start, end), start, end, visible, keep)
            if keep:
                kept += [beta, weights]
            block_out = torch.bmm(weights, inputs.value[:, inputs.key_len - visible :])  # [B * H, G * t, D]
            if remainder_to_current:
                remainder = 1.0 - weights.sum(-1, keepdim=True)
                block_out.addcmul_(remainder, inputs.own_values(start, end))
            out[..., start:end, :] = block_out.view(*out.shape[:3], end - start, -1)
        ctx.save_for_backward(query, key, value, padding, *kept)
        ctx.options = (attend_current, remainder_to_current, chunk_size)
        return out.to(value.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # backward() may be called under autocast
            return _StickBreakingAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        query, key, value, padding, *kept = ctx.saved_tensors
        kept = iter(zip(kept[::2], kept[1::2]))  # (beta, weights) per block, if the forward pass kept them
        attend_current, remainder_to_current, chunk_size = ctx.options
        inputs = _Inputs(query, key, value, padding, attend_current, chunk_size)
        grad_out = grad_out.to(inputs.query.dtype)
        grad_query = torch.empty_like(inputs.query)
        grad_key = torch.zeros_like(inputs.key)  # [B * H, S, D], reversed like the keys
        grad_value = torch.zeros_like(inputs.value)
        for start, end, visible in inputs.blocks():
            t, seen = end - start, slice(inputs.key_len - visible, None)
            block_query = inputs.block_query(start, end)
            block_grad = grad_out[..., start:end, :].reshape(block_query.shape)  # [B * H, G * t, D]
            beta, weights = next(kept, None) or _block_weights(inputs, block_query, start, end, visible)
            grad_weights = inputs.scratch("grad_weights", *beta.shape)
            torch.bmm(block_grad, inputs.value[:, seen].transpose(1, 2), out=grad_weights)  # dL/dA
            grad_value[:, seen] += torch.bmm(weights.transpose(1, 2), block_grad)
            if remainder_to_current:  # out += (1 - sum_j A_j) * v_own
                grad_weights -= (block_grad * inputs.own_values(start, end)).sum(-1, keepdim=True)
                remainder = 1.0 - weights.sum(-1, keepdim=True)
                own_grad = (remainder * block_grad).view(-1, inputs.groups, t, inputs.dim).sum(1)
                grad_value[:, inputs.own_rows(start, end)] += own_grad.flip(1)
            grad_log_weights = grad_weights.mul_(weights)  # G = dL/dA * A
            # dL/dl_j = G_j - beta_j * sum of G over key j and every farther key: with keys nearest first,
            # that sum is the row total minus the inclusive cumsum plus G_j (an error of ~eps * sum |G|, absolute)
            minus_farther = torch.cumsum(grad_log_weights, -1, out=inputs.scratch("cumsum", *beta.shape))
            minus_farther.sub_(minus_farther[..., -1:]).sub_(grad_log_weights)
            grad_logits = grad_log_weights.addcmul_(beta, minus_farther)
            block_grad_query = torch.bmm(grad_logits, inputs.key[:, seen]) * inputs.dim**-0.5
            grad_query[..., start:end, :] = block_grad_query.view(*grad_query.shape[:3], t, -1)
            grad_key[:, seen] += torch.bmm(grad_logits.transpose(1, 2), block_query)  # q / sqrt(D)
        grad_key = grad_key.view(key.shape).flip(2).to(key.dtype)  # keys in order
        grad_value = grad_value.view(value.shape).flip(2).to(value.dtype)
        return grad_query.to(query.dtype), grad_key, grad_value, None, None, None, None, None


def _attention_with_weights(query, key, value, padding, attend_current, remainder_to_current, chunk_size):
    """The same attention through plain autograd, with the weights materialised and returned: the output is computed
    from them, so gradients reach them (e.g. `retain_grad`). For inspection, not speed."""
    inputs = _Inputs(query, key, value, padding, attend_current, chunk_size)
    batch, heads, groups, seq_len, _ = query.shape
    blocks = []
    for start, end, visible in inputs.blocks():
        weights = _weights_from_logits(inputs.logits(inputs.block_query(start, end), start, end, visible))
        weights = F.pad(weights.flip(-1), (0, inputs.key_len - visible))  # keys in order
        blocks.append(weights.view(batch, heads, groups, end - start, -1))
    returned = torch.cat(blocks, dim=-2).flatten(1, 2)  # [B, H * G, T, S]
    weights = returned.view(batch, heads, groups, seq_len, -1)
    values = value.to(weights.dtype).unsqueeze(2)  # [B, H, 1, S, D], in order
    out = weights @ values
    if remainder_to_current:
        out = out + (1.0 - weights.sum(-1, keepdim=True)) * values[..., inputs.offset :, :]
    return out.to(value.dtype), returned
