"""Triton kernels for the expert dispatch's grouped linear map on GPUs (ScatterMoE / MoEUT CVMM style).

`moe_dispatch.grouped_linear` uses them on CUDA where torch's `grouped_mm` has no fused kernel (fp32 and fp16
everywhere, bf16 below Hopper): there torch runs one matmul launch per expert, and MoEUT's 387 small experts make a
layer's forward and backward ~2300 launches. Here each product is one launch:

- :func:`triton_grouped_linear` (forward, and the input gradient with the weight read transposed): a grid of
  `[BLOCK_M, BLOCK_N]` output tiles over the rows sorted by expert, each row block inside one expert's rows (the
  block table is built on the device from the dispatch plan's offsets, with no host synchronisation);
- the weight gradient: one `[BLOCK_IN, BLOCK_OUT]` tile of one expert per program, summing over its rows.

Products accumulate in fp32; fp32 operands use TF32 only where `torch.backends.cuda.matmul.allow_tf32` allows it,
as a torch matmul would. `moe_dispatch` imports this module only where Triton is installed: nothing else needs it.
With `TRITON_INTERPRET=1` the kernels run on CPU tensors, which is how the test suite checks them against the
per-expert loop (`tests/test_moe_triton.py`).
"""

from functools import cache

import torch
from transformers.utils import logging

try:  # `moe_dispatch` imports this module only where Triton is installed (remote code must not require it)
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
    """The forward kernel's grid: row blocks of `block_m` sorted rows, none straddling two experts.

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


@cache
def kernels_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels build and run on `device` for `dtype`, probed once per process with a small forward and
    backward (no random numbers: the caller's generator is untouched). A GPU or Triton version they fail on gets a
    warning and torch's path instead of an error in the middle of training."""
    try:
        with torch.enable_grad():
            x = torch.ones(32, 32, device=device, dtype=dtype, requires_grad=True)
            weight = torch.ones(2, 32, 32, device=device, dtype=dtype, requires_grad=True)
            offsets = torch.tensor([16, 32], device=device, dtype=torch.int32)
            triton_grouped_linear(x, weight, offsets, [16, 16]).sum().backward()
    except Exception as error:  # whatever fails to compile or launch: CompilationError, OutOfResources, ptxas, ...
        logger.warning_once(
            f"modeling_mom: the Triton expert kernels failed on {device} for {dtype} ({type(error).__name__}: "
            f"{error}); the expert dispatch uses torch's grouped matmul instead. MODELING_MOM_TRITON=0 skips the probe."
        )
        return False
    return True
