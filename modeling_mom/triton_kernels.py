"""Triton kernels for GPUs: the expert dispatch's grouped linear map (ScatterMoE / MoEUT CVMM style) and stick-breaking
attention (FlashAttention style). Optional: modules import this one only where Triton is installed and only on CUDA
(`MODELING_MOM_TRITON=0` switches both off), and each kernel is probed once per device and dtype
(:func:`kernel_works`), so that a GPU or Triton version it fails to build on gets a warning and the PyTorch path.

**Grouped linear.** `moe_dispatch.grouped_linear` uses it where torch's `grouped_mm` has no fused kernel (fp32 and
fp16 everywhere, bf16 below Hopper): there torch runs one matmul launch per expert, and MoEUT's 387 small experts make
a layer's forward and backward ~2300 launches. Here each product is one launch:

- :func:`triton_grouped_linear` (forward, and the input gradient with the weight read transposed): a grid of
  `[BLOCK_M, BLOCK_N]` output tiles over the rows sorted by expert, each row block inside one expert's rows (the
  block table is built on the device from the dispatch plan's offsets, with no host synchronisation);
- the weight gradient: one `[BLOCK_IN, BLOCK_OUT]` tile of one expert per program, summing over its rows.

**Stick-breaking attention** (:func:`triton_stick_breaking`, used by `stickbreaking_attention` on CUDA). Each program
takes a block of query rows and walks its key blocks nearest first, as the mechanism breaks the stick, in log space:
with `b = softplus(l) = -log(1 - sigmoid(l))` per logit, `log A_ij = l_ij - b_ij - sum_{nearer m} b_im`, the sum
carried from block to block and completed inside a block by a reverse cumulative sum. Nothing of size T x S is
stored (memory O(T D)); the backward pass recomputes the weights the same way and uses the row total of
`G = dL/dA * A`, `sum_j G_ij = dO_i . o_i + dL/ds_i * s_i` (`s` the row sums of `A`, as FlashAttention uses
`dO . O`), to turn the sum over farther keys in `dL/dl_ij = G_ij - beta_ij * sum_{j' <= j} G_ij'` into the total
minus the nearer keys' sum. Key and value gradients are summed over query blocks and groups with atomic adds.

Products accumulate in fp32; fp32 operands use TF32 only where `torch.backends.cuda.matmul.allow_tf32` allows it,
as a torch matmul would. With `TRITON_INTERPRET=1` the kernels run on CPU tensors, which is how the test suite
checks them against the PyTorch paths (`tests/test_triton_kernels.py`). The kernels use only Triton's built-in
operations and their own `@triton.jit` helpers (`tl.cumsum`, `tl.sum` and `tl.sigmoid` are themselves jitted
functions of Triton's library, which the interpreter cannot call when Triton was imported before it was switched on).
"""

from functools import cache

import torch
from transformers.utils import logging

try:  # imported only where Triton is installed (remote code must not require it)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("modeling_mom's Triton kernels need Triton: `pip install triton`") from error

logger = logging.get_logger(__name__)


@triton.jit
def _grouped_matmul_kernel(
    x_ptr, w_ptr, out_ptr, block_expert_ptr, block_start_ptr, expert_end_ptr,
    N, K,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out[rows] = x[rows] @ w[e] for one `[BLOCK_M, BLOCK_N]` tile; the rows all belong to expert e."""
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    rows = tl.load(block_start_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(expert_end_ptr + expert)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + expert * stride_we + cols[None, :] * stride_wn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_weight_grad_kernel(
    x_ptr, dy_ptr, dw_ptr, expert_start_ptr, expert_end_ptr,
    K, N,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwe, stride_dwk, stride_dwn,
    BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_ROWS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dw[e] = x[rows of e]^T @ dy[rows of e] for one `[BLOCK_IN, BLOCK_OUT]` tile (zeros for an expert without
    rows)."""
    expert = tl.program_id(0).to(tl.int64)
    start, end = tl.load(expert_start_ptr + expert), tl.load(expert_end_ptr + expert)
    ins = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    outs = tl.program_id(2) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    in_mask, out_mask = ins < K, outs < N
    acc = tl.full((BLOCK_IN, BLOCK_OUT), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < end
        rows = rows.to(tl.int64)
        xt = tl.load(
            x_ptr + rows[None, :] * stride_xm + ins[:, None] * stride_xk,
            mask=in_mask[:, None] & row_mask[None, :],
            other=0.0,
        )  # [BLOCK_IN, BLOCK_ROWS]
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
            mask=row_mask[:, None] & out_mask[None, :],
            other=0.0,
        )  # [BLOCK_ROWS, BLOCK_OUT]
        acc = tl.dot(xt, dy, acc, input_precision=INPUT_PRECISION)
    dw = dw_ptr + expert * stride_dwe + ins[:, None] * stride_dwk + outs[None, :] * stride_dwn
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=in_mask[:, None] & out_mask[None, :])


_BLOCK_N, _BLOCK_K = 64, 32  # output columns and inner dimension per tile (both kernels)


def _input_precision(dtype: torch.dtype) -> str | None:
    """`tl.dot`'s precision for fp32 operands, as torch's matmul would choose; None (Triton's default) for 16-bit ones,
    which multiply exactly on tensor cores."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


class RowBlocks:
    """The grids of both grouped kernels: row blocks of `block_m` sorted rows, none straddling two experts (the
    matmul's), and each expert's first and last rows (the weight gradient's).

    Built on the device from `offsets` (`[E]` int32 cumulative counts); only the number of blocks, a sum over the
    host counts the dispatch plan already holds, sizes the grid.
    """

    def __init__(self, offsets: torch.Tensor, counts: list[int]):
        mean_rows = sum(counts) / max(len(counts), 1)
        self.block_m = min(64, max(16, triton.next_power_of_2(int(mean_rows))))  # tl.dot needs >= 16
        num_blocks = sum(-(-count // self.block_m) for count in counts)
        self.expert_end = offsets.long()
        expert_counts = torch.diff(self.expert_end, prepend=self.expert_end.new_zeros(1))
        self.expert_start = self.expert_end - expert_counts
        blocks_per_expert = torch.div(expert_counts + self.block_m - 1, self.block_m, rounding_mode="floor")
        experts = torch.arange(len(counts), device=offsets.device)
        self.block_expert = experts.repeat_interleave(blocks_per_expert, output_size=num_blocks)  # [num_blocks]
        first_block = (blocks_per_expert.cumsum(0) - blocks_per_expert).index_select(0, self.block_expert)
        block_rank = torch.arange(num_blocks, device=offsets.device) - first_block
        self.block_start = self.expert_start.index_select(0, self.block_expert) + block_rank * self.block_m

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, transpose_weight: bool = False) -> torch.Tensor:
        """`x[S, K] @ weight[e]` per row block (`weight[e].T` with `transpose_weight`) -> `[S, N]`."""
        stride_we, stride_wk, stride_wn = weight.stride()
        if transpose_weight:
            stride_wk, stride_wn = stride_wn, stride_wk
        n = weight.shape[1] if transpose_weight else weight.shape[2]
        out = x.new_empty(x.shape[0], n)
        grid = (self.block_expert.shape[0], triton.cdiv(n, _BLOCK_N))
        if x.shape[0] > 0:
            _grouped_matmul_kernel[grid](
                x, weight, out, self.block_expert, self.block_start, self.expert_end,
                n, x.shape[1],
                *x.stride(), stride_we, stride_wk, stride_wn, *out.stride(),
                BLOCK_M=self.block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, INPUT_PRECISION=_input_precision(x.dtype),
            )  # fmt: skip
        return out

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor, num_experts: int) -> torch.Tensor:
        """`[E, K, N]`: per expert, `x[rows]^T @ grad_out[rows]`."""
        k, n = x.shape[1], grad_out.shape[1]
        grad = x.new_empty(num_experts, k, n)
        grid = (num_experts, triton.cdiv(k, _BLOCK_N), triton.cdiv(n, _BLOCK_N))
        _grouped_weight_grad_kernel[grid](
            x, grad_out, grad, self.expert_start, self.expert_end,
            k, n,
            *x.stride(), *grad_out.stride(), *grad.stride(),
            BLOCK_IN=_BLOCK_N, BLOCK_OUT=_BLOCK_N, BLOCK_ROWS=_BLOCK_K, INPUT_PRECISION=_input_precision(x.dtype),
        )  # fmt: skip
        return grad


class _TritonGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, blocks):
        ctx.save_for_backward(x, weight)
        ctx.blocks = blocks
        return blocks.matmul(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.blocks.matmul(grad_out, weight, transpose_weight=True)
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.blocks.weight_grad(x, grad_out, weight.shape[0])
        return grad_x, grad_weight, None


def triton_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """`x[S, in]` (rows sorted by expert; `offsets` `[E]` cumulative counts, `counts` on the host) times
    `weight[e, in, out]` -> `[S, out]`, differentiable in `x` and `weight`."""
    return _TritonGroupedLinear.apply(x, weight, RowBlocks(offsets, counts))


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _softplus(x):
    """`log(1 + e^x) = -log(1 - sigmoid(x))`, the log of what key x breaks off the stick; 0 at `x = -inf`."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _stick_logits(
    q, k_base, pad_base, cols, positions, row_mask, dims, dim_mask, key_len, head_dim, scale,
    ATTEND_CURRENT: tl.constexpr, HAS_PADDING: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """`[BLOCK_M, BLOCK_N]` logits of the query rows over the key block `cols` (-inf where a key may not be attended
    to: after the query, padding, past the end), the keys `[BLOCK_N, BLOCK_D]` and the visibility mask."""
    key_mask = cols < key_len
    k_mask = key_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_base + cols[:, None] * head_dim + dims[None, :], mask=k_mask, other=0.0)
    logits = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale
    if ATTEND_CURRENT:
        visible = cols[None, :] <= positions[:, None]
    else:
        visible = cols[None, :] < positions[:, None]
    visible = visible & row_mask[:, None] & key_mask[None, :]
    if HAS_PADDING:
        padded = tl.load(pad_base + cols, mask=key_mask, other=1)
        visible = visible & (padded == 0)[None, :]
    return tl.where(visible, logits, float("-inf")), k, visible


@triton.jit
def _stick_weights(logits, carry):
    """`A = beta * prod_{nearer keys} (1 - beta)` for one key block in log space; `carry` `[BLOCK_M]` is what the
    nearer key blocks broke off (sum of softplus). Returns `A`, `beta` and the block's own row sums of softplus."""
    broken = _softplus(logits)
    nearer = tl.associative_scan(broken, 1, _add, reverse=True) - broken + carry[:, None]
    log_beta = logits - broken
    return tl.exp(log_beta - nearer), tl.exp(log_beta), tl.reduce(broken, 1, _add)


@triton.jit
def _stick_breaking_kernel(
    q_ptr, k_ptr, v_ptr, pad_ptr, out_ptr, rowsum_ptr,
    grad_out_ptr, grad_rowsum_ptr, grad_total_ptr, grad_q_ptr, grad_k_ptr, grad_v_ptr,
    seq_len, key_len, heads, groups, head_dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
    HAS_PADDING: tl.constexpr, BACKWARD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of query rows of one (batch, head, group), all tensors contiguous: q, out `[B, H, G, T, D]`, k, v
    `[B, H, S, D]`, rowsum `[B, H, G, T]`, padding `[B, S]` (1 = padding). The forward pass writes the output and the
    row sums of the weights; the backward pass (`BACKWARD`) the gradients, from the output's and the row sums'
    gradients and `grad_total` (`sum_j dL/dA_ij * A_ij` per row)."""
    bhg = tl.program_id(1).to(tl.int64)
    head = bhg // groups
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_len
    positions = key_len - seq_len + rows  # query rows are the last T of the S positions
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    tile_mask = row_mask[:, None] & dim_mask[None, :]
    row_offsets = bhg * seq_len * head_dim + rows[:, None] * head_dim + dims[None, :]
    q = tl.load(q_ptr + row_offsets, mask=tile_mask, other=0.0)
    k_base, v_base = k_ptr + head * key_len * head_dim, v_ptr + head * key_len * head_dim
    pad_base = pad_ptr + (head // heads) * key_len
    if BACKWARD:
        grad_out = tl.load(grad_out_ptr + row_offsets, mask=tile_mask, other=0.0)
        grad_rowsum = tl.load(grad_rowsum_ptr + bhg * seq_len + rows, mask=row_mask, other=0.0)
        grad_total = tl.load(grad_total_ptr + bhg * seq_len + rows, mask=row_mask, other=0.0)
        carry_grad = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)  # the output, or the query's gradient
    rowsum = tl.full([BLOCK_M], 0.0, tl.float32)
    carry = tl.full([BLOCK_M], 0.0, tl.float32)
    visible_end = key_len - seq_len + tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, seq_len)
    num_blocks = (visible_end + BLOCK_N - 1) // BLOCK_N
    for step in range(0, num_blocks):  # key blocks, nearest first
        cols = (num_blocks - 1 - step) * BLOCK_N + tl.arange(0, BLOCK_N)
        logits, k, visible = _stick_logits(
            q, k_base, pad_base, cols, positions, row_mask, dims, dim_mask, key_len, head_dim, scale,
            ATTEND_CURRENT, HAS_PADDING, INPUT_PRECISION,
        )  # fmt: skip
        weights, beta, broken = _stick_weights(logits, carry)
        carry += broken
        kv_mask = (cols < key_len)[:, None] & dim_mask[None, :]
        kv_offsets = cols[:, None] * head_dim + dims[None, :]
        v = tl.load(v_base + kv_offsets, mask=kv_mask, other=0.0)
        if BACKWARD:
            grad_weights = tl.dot(grad_out, tl.trans(v), input_precision=INPUT_PRECISION) + grad_rowsum[:, None]
            g = weights * grad_weights  # dL/dA * A
            nearer_g = tl.associative_scan(g, 1, _add, reverse=True) - g + carry_grad[:, None]
            carry_grad += tl.reduce(g, 1, _add)
            grad_logits = tl.where(visible, g - beta * (grad_total[:, None] - nearer_g), 0.0) * scale
            acc = tl.dot(grad_logits.to(k.dtype), k, acc, input_precision=INPUT_PRECISION)
            grad_k = tl.dot(tl.trans(grad_logits.to(q.dtype)), q, input_precision=INPUT_PRECISION)
            grad_v = tl.dot(tl.trans(weights.to(grad_out.dtype)), grad_out, input_precision=INPUT_PRECISION)
            tl.atomic_add(grad_k_ptr + head * key_len * head_dim + kv_offsets, grad_k, mask=kv_mask)
            tl.atomic_add(grad_v_ptr + head * key_len * head_dim + kv_offsets, grad_v, mask=kv_mask)
        else:
            acc = tl.dot(weights.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
            rowsum += tl.reduce(weights, 1, _add)
    if BACKWARD:
        tl.store(grad_q_ptr + row_offsets, acc, mask=tile_mask)
    else:
        tl.store(out_ptr + row_offsets, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(rowsum_ptr + bhg * seq_len + rows, rowsum, mask=row_mask)


class _TritonStickBreaking(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, padding, attend_current, block_size):
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        out = torch.empty_like(query)
        rowsum = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.launch = _stick_breaking_launcher(query, key, padding, attend_current, block_size)
        ctx.launch(query, key, value, padding, out, rowsum)
        ctx.save_for_backward(query, key, value, padding, out, rowsum)
        return out, rowsum

    @staticmethod
    def backward(ctx, grad_out, grad_rowsum):
        query, key, value, padding, out, rowsum = ctx.saved_tensors
        grad_out, grad_rowsum = grad_out.contiguous(), grad_rowsum.float().contiguous()
        grad_total = (grad_out.float() * out.float()).sum(-1) + grad_rowsum * rowsum  # sum_j dL/dA_ij * A_ij
        grad_query = torch.empty_like(query, dtype=torch.float32)
        grad_key = torch.zeros_like(key, dtype=torch.float32)
        grad_value = torch.zeros_like(value, dtype=torch.float32)
        ctx.launch(query, key, value, padding, out, rowsum,
                   grad_out, grad_rowsum, grad_total, grad_query, grad_key, grad_value)  # fmt: skip
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None, None


STICK_BREAKING_STAGES = 2  # software pipelining depth of the key loop: 3 (Triton's default) overflows 99 KB in fp32


def stick_breaking_tiles(
    dtype: torch.dtype,
    seq_len: int,
    key_len: int,
    head_dim: int,
    block_size: int | None = None,
    shared_memory: int = 232448,
):
    """The kernel's tile sizes: `BLOCK_N` keys (`block_size`, by default 64 for 16-bit operands up to 128-wide heads
    and 32 otherwise, which keeps the backward pass within the 99 KB of shared memory per block of consumer Ampere
    and Ada GPUs, the least since Ampere; half that where a block gets less `shared_memory` (bytes), such as Turing's
    64 KB; never more than S needs), `BLOCK_M` query rows (as many, or fewer when T is smaller: decoding) and
    `BLOCK_D` (the head size rounded up to a power of two). `tests/test_triton_kernels.py` compiles the largest for
    GPU targets and checks their shared memory."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size={block_size}: the stick-breaking kernel's tiles take a power of two >= 16.")
    if block_size is None:
        block_size = 64 if dtype.itemsize == 2 and block_d <= 128 else 32
        if shared_memory < 99 * 1024:
            block_size //= 2
        block_size = min(block_size, max(16, triton.next_power_of_2(key_len)))
    block_m = min(block_size, max(16, triton.next_power_of_2(seq_len)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_size, BLOCK_D=block_d)


@cache
def _shared_memory_per_block(device: torch.device) -> int:
    """The most shared memory a block may use on `device` (bytes); Hopper's 227 KB off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 232448
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 49152)


def _stick_breaking_launcher(query, key, padding, attend_current, block_size):
    """The kernel's launch for these shapes and options: `launch(q, k, v, padding, out, rowsum)` runs the forward
    pass, with the six gradient tensors appended the backward pass."""
    batch, heads, groups, seq_len, head_dim = query.shape
    shared_memory = _shared_memory_per_block(query.device)
    tiles = stick_breaking_tiles(query.dtype, seq_len, key.shape[2], head_dim, block_size, shared_memory)
    grid = (triton.cdiv(seq_len, tiles["BLOCK_M"]), batch * heads * groups)
    options = dict(
        **tiles, ATTEND_CURRENT=attend_current, HAS_PADDING=padding is not None,
        INPUT_PRECISION=_input_precision(query.dtype),
    )  # fmt: skip

    def launch(q, k, v, pad, out, rowsum, *grads):
        backward = bool(grads)
        grads = grads or (out, rowsum, rowsum, out, k, v)  # unused in the forward pass
        _stick_breaking_kernel[grid](
            q, k, v, k if pad is None else pad, out, rowsum, *grads,
            seq_len, key.shape[2], heads, groups, head_dim, head_dim**-0.5,
            BACKWARD=backward, num_stages=STICK_BREAKING_STAGES, **options,
        )  # fmt: skip

    return launch


def triton_stick_breaking(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding: torch.Tensor | None = None,
    attend_current: bool = True,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stick-breaking attention of `query` `[B, H, G, T, D]` over `key`, `value` `[B, H, S, D]` (the queries are the
    last T of the S positions; `padding` `[B, S]`, true for padding keys), as `stickbreaking_attention` defines it:
    the output `sum_j A_ij v_j` `[B, H, G, T, D]` and the row sums `sum_j A_ij` `[B, H, G, T]` (fp32, for the
    remainder of Tan et al.'s variant), both differentiable. `block_size`: keys per tile, and query rows unless T is
    smaller (at least 16; by default see `stick_breaking_tiles`)."""
    padding = None if padding is None else padding.to(torch.uint8).contiguous()
    return _TritonStickBreaking.apply(query, key, value, padding, attend_current, block_size)


def _probe_grouped_linear(device: torch.device, dtype: torch.dtype) -> None:
    """The largest tiles (64 rows per expert on average)."""
    x = torch.ones(128, 32, device=device, dtype=dtype, requires_grad=True)
    weight = torch.ones(2, 32, 32, device=device, dtype=dtype, requires_grad=True)
    offsets = torch.tensor([64, 128], device=device, dtype=torch.int32)
    triton_grouped_linear(x, weight, offsets, [64, 64]).sum().backward()


def _probe_stick_breaking(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """64 positions: the largest tiles the kernel takes at this head size on this device; both variants."""
    query = torch.ones(1, 1, 1, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    key = torch.ones(1, 1, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    padding = torch.zeros(1, 64, device=device, dtype=torch.bool)
    for attend_current, mask in ((True, None), (False, padding)):
        out, rowsum = triton_stick_breaking(query, key, key, mask, attend_current)
        (out.sum() + rowsum.sum()).backward()


_PROBES = {"grouped_linear": _probe_grouped_linear, "stick_breaking": _probe_stick_breaking}


@cache
def kernel_works(kernel: str, device: torch.device, dtype: torch.dtype, *sizes: int) -> bool:
    """Whether `kernel` ("grouped_linear", or "stick_breaking" with the head size as `sizes`) builds and runs on
    `device` for `dtype`, probed once per process and argument set with a small forward and backward at its largest
    tiles (no random numbers: the caller's generator is untouched). A GPU or Triton version it fails on (a compiler
    error, too little shared memory) gets a warning, and its caller the PyTorch path instead of an error in the
    middle of training."""
    probe = _PROBES[kernel]  # outside the try: an unknown name is a bug, not a kernel that fails to build
    try:
        with torch.inference_mode(False), torch.enable_grad():  # the caller may be in either
            probe(device, dtype, *sizes)
    except Exception as error:  # whatever fails to compile or launch: CompilationError, OutOfResources, ptxas, ...
        logger.warning_once(
            f"modeling_mom: the Triton {kernel} kernel failed on {device} for {dtype} ({type(error).__name__}: "
            f"{error}); the PyTorch path runs instead. MODELING_MOM_TRITON=0 skips the probe."
        )
        return False
    return True
