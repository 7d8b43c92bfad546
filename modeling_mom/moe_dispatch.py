"""Token -> module/expert dispatch shared by MoM, MoEUT and ModuleFormer.

Every routed layer of the three architectures does the same thing: each token picks ``k`` of ``E`` experts
(modules), the chosen (token, slot) pairs are sorted by expert, the rows are gathered, each expert's rows go
through that expert's weight in one grouped matmul, and the results are scattered back, weighted by the gates.

    plan = plan_dispatch(selected_experts, num_experts)         # one sort per routing decision
    h = gathered_linear(x, w_in, plan)                          # [S, out], S = number of kept (token, slot) pairs
    y = scatter_rows(h, plan, num_tokens, gates=weights)        # [T, out], weighted sum over each token's slots

:func:`gathered_linear` is the gather and the first grouped matmul in one, whose backward pass gathers the rows again
instead of keeping them (they are ``k`` times the size of ``x``). An expert feed-forward layer (every FFN pool of the
three) is :func:`expert_mlp`: the two grouped linears around the activation, between the gather and the gated
scatter.

Selections equal to or above ``num_experts`` (MoM's SKIP) are dropped from the plan, so they contribute zero.

The grouped matmul uses ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older torch) where the
device and dtype support it (on operands zero-padded to 16-byte feature multiples where they are not), and
otherwise one matmul per expert over ``split`` / ``unbind`` views. Indexing
``weight[e]`` inside an autograd loop is never used: its backward materialises a full-size zero gradient per
expert (quadratic in the number of experts). Small bf16 products on CPU run as one ``bmm`` over the experts' rows
padded to the largest count instead (each bf16 matmul has a large fixed cost there). On CUDA, where torch has no
fused ``grouped_mm`` kernel for the dtype and GPU, the Triton kernels of ``triton_kernels`` run it (one launch per
product instead of one per expert; see :func:`_triton_wins`). Without autograd and with a
few rows per small expert (decoding), one weighted ``embedding_bag`` over the chosen experts' weights computes every
row instead; a layer can then skip the sort and the scatter too (:func:`bag_mixture`: the bag's sum is the
gate-weighted sum over a token's experts).

The single host-device synchronisation is in :func:`plan_dispatch` (the per-expert counts are read once, to
drop SKIP selections, to split rows for the fallback path and to size the padded layout).
"""

import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers.utils import is_triton_available

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def experts_bias_flag(config_field: str) -> property:
    """`has_bias` of an experts class under transformers' `@use_experts_implementation`, read from
    `config.<config_field>`: the decorator assigns one class-wide value after `__init__`, which is ignored, since
    whether the experts have biases is a config choice."""
    return property(lambda self: getattr(self.config, config_field), lambda self, class_wide_value: None)


@dataclass
class DispatchPlan:
    """Where each kept (token, slot) pair goes, sorted by expert.

    Attributes:
        token_index: `[S]` input row read by each sorted pair.
        flat_index: `[S]` position of each pair in the flattened `[T * k]` selection (to pick its gate).
        expert_index: `[S]` expert of each sorted pair, ascending.
        offsets: `[E]` int32 cumulative row counts per expert (`grouped_mm`'s `offs`).
        counts: per-expert row counts on the host (for the fallback split).
    """

    token_index: torch.Tensor
    flat_index: torch.Tensor
    expert_index: torch.Tensor
    offsets: torch.Tensor
    counts: list[int]

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    @cached_property
    def padded_slots(self) -> torch.Tensor:
        """`[S]` row of each sorted pair in an `[E * C]` layout where expert e owns rows `e * C` to `e * C + C - 1`
        (C = the largest count); computed once per plan, for both projections of an expert FFN."""
        starts = F.pad(self.offsets[:-1].long(), (1, 0))  # first sorted row of each expert
        rank = torch.arange(self.expert_index.shape[0], device=self.expert_index.device)
        return self.expert_index * max(self.counts) + rank - starts.index_select(0, self.expert_index)


def plan_dispatch(selected_experts: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the `[T, k]` expert choices by expert; choices `>= num_experts` (SKIP) are dropped."""
    k = selected_experts.shape[-1]
    flat = selected_experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
    host_counts = counts.tolist()  # the dispatch's one host sync
    order = order[: sum(host_counts)]
    return DispatchPlan(
        token_index=torch.div(order, k, rounding_mode="floor"),
        flat_index=order,
        expert_index=flat.index_select(0, order),
        offsets=counts.cumsum(0).to(torch.int32),
        counts=host_counts,
    )


def gather_rows(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """`[T, d]` -> `[S, d]`: the input row of every sorted pair (`index_select`, not advanced indexing)."""
    return x.index_select(0, plan.token_index)


def sorted_gates(gates: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """`[T, k]` gates -> `[S, 1]`, aligned with the sorted pairs."""
    return gates.reshape(-1).index_select(0, plan.flat_index).unsqueeze(-1)


class _ScatterRows(torch.autograd.Function):
    """`zeros(num_tokens, d).index_add(0, index, y)` whose backward pass keeps only the `[S]` index: `index_add`'s
    keeps `y` too (for its shape), the `[S, d]` expert outputs, and `scatter_add`'s an index of `y`'s shape (a
    stride-0 view, but hooks that copy saved tensors, such as `save_on_cpu`, make it dense)."""

    @staticmethod
    def forward(y: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return y.new_zeros(num_tokens, y.shape[-1]).index_add(0, index, y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def scatter_rows(
    y: torch.Tensor, plan: DispatchPlan, num_tokens: int, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """`[S, d]` -> `[T, d]`: sum each token's pairs back into its row, multiplied by `gates` (`[T, k]`) if given."""
    if gates is not None:
        y = y * sorted_gates(gates, plan).to(y.dtype)
    return _ScatterRows.apply(y, plan.token_index, num_tokens)


# the saved-tensors hooks in force (e.g. non-reentrant gradient checkpointing's), which `gathered_linear` nests inside;
# torch has no public accessor (its own AOTAutograd reads them this way). Without it, rows are kept as usual.
_AUTOGRAD = torch._C._autograd
_TOP_SAVED_TENSORS_HOOKS = getattr(_AUTOGRAD, "_top_saved_tensors_default_hooks", None)
_SAVED_TENSORS_HOOKS_ENABLED = getattr(_AUTOGRAD, "_saved_tensors_hooks_is_enabled", None)


def _check_version(tensor: torch.Tensor, version: int, what: str) -> None:
    """Autograd's in-place check, which it skips for tensors saved through hooks."""
    if tensor._version != version:
        raise RuntimeError(
            f"{what} needed for the backward pass of an expert dispatch was modified in place after the forward pass "
            f"(version {version} -> {tensor._version})"
        )


class _Kept:
    """A tensor autograd keeps as it is (under `gathered_linear`'s hooks, with no enclosing ones): detached, so that a
    saved output does not hold its own graph, and checked against in-place changes on unpacking."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor.detach(), None if tensor.is_inference() else tensor._version

    def unpack(self) -> torch.Tensor:
        if self.version is not None:
            _check_version(self.tensor, self.version, "a tensor")
        return self.tensor


class _GatheredRows:
    """What autograd keeps of the rows `source.index_select(0, index).to(dtype)` (see `gathered_linear`): the
    source and the index (each passed through the enclosing saved-tensors hooks if any), gathered again on
    unpacking. `rows(start, stop)` gathers the sorted rows `start:stop` (the per-expert loop saves slices)."""

    def __init__(self, source: torch.Tensor, index: torch.Tensor, dtype: torch.dtype, outer_hooks):
        self.dtype, self.outer_hooks, self.version = dtype, outer_hooks, source._version
        self.packed = (source, index) if outer_hooks is None else tuple(map(outer_hooks[0], (source, index)))
        self.unpacked = None

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if self.outer_hooks is None:  # (enclosing hooks decide what an in-place change means: copy, recompute...)
            _check_version(self.packed[0], self.version, "the input")
        if self.unpacked is None:  # enclosing hooks unpack once (checkpointing refuses a second unpacking)
            self.unpacked = self.packed if self.outer_hooks is None else tuple(map(self.outer_hooks[1], self.packed))
        source, index = self.unpacked
        return source.index_select(0, index[start:stop]).to(self.dtype)


@dataclass
class _RowRange:
    """Rows `start:stop` of a `_GatheredRows` (all of them, or one expert's split in the per-expert loop)."""

    gathered: _GatheredRows
    start: int
    stop: int


def _regather_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autograd will keep the gathered rows (for `weight`'s gradient) and saved-tensors hooks may replace
    them: not while compiling (AOTAutograd chooses what to keep), where hooks are disabled (torch.func) nor for an
    inference tensor (no version counter to check)."""
    if not (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling() or x.is_inference():
        return False
    return _TOP_SAVED_TENSORS_HOOKS is not None and _SAVED_TENSORS_HOOKS_ENABLED is not None and (
        _SAVED_TENSORS_HOOKS_ENABLED()
    )


def gathered_linear(
    x: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`grouped_linear(gather_rows(x, plan), weight, plan, bias)` -> `[S, out]`, whose backward pass gathers the
    rows from `x` again instead of keeping them.

    The gathered rows `[S, in]` are `k` times the size of `x` `[T, in]` (16x at MoEUT-244M's feed-forward) and, kept
    for the weight gradient, were most of an expert layer's activation memory; ScatterMoE avoids them by gathering
    inside its matmul kernel. Here saved-tensors hooks keep `x` (which the graph holds anyway, for the router or the
    LayerNorm) and the plan's index in their place, and the backward pass gathers again: one `index_select`
    (training steps took the same time or less; `benchmarks/RESULTS.md`, "Training memory"). This covers the paths
    that multiply the rows themselves (`grouped_mm`, the Triton kernel, the per-expert loop); the padded `bmm` of
    small bf16 experts on CPU keeps its padded copy. Enclosing hooks (non-reentrant gradient checkpointing,
    offloading) receive `x` and the index, and everything else saved, and their rules apply to them; without such
    hooks, changing `x` or a weight in place before the backward pass is refused as autograd refuses it.
    """
    rows = gather_rows(x, plan)
    if torch.is_autocast_enabled(x.device.type):  # cast the rows as `grouped_linear` would; x.grad sums in x's dtype
        rows = rows.to(torch.get_autocast_dtype(x.device.type))
    if not _regather_applies(x, weight):
        return grouped_linear(rows, weight, plan, bias)
    outer = _TOP_SAVED_TENSORS_HOOKS(True)
    # autograd keeps the hooks as long as what they saved: they must not hold `rows` (nor `x`, for enclosing hooks)
    pending = {"rows": rows, "source": x, "index": plan.token_index}

    def pack(tensor: torch.Tensor):
        rows = pending["rows"]
        row_range = tensor._base is rows and tensor.stride() == rows.stride() and tensor.shape[1:] == rows.shape[1:]
        if tensor is rows or row_range:
            if "kept" not in pending:
                pending["kept"] = _GatheredRows(pending["source"], pending["index"], rows.dtype, outer)
            start = (tensor.storage_offset() - rows.storage_offset()) // rows.stride(0)  # a split: a row range
            return _RowRange(pending["kept"], start, start + tensor.shape[0])
        return _Kept(tensor) if outer is None else outer[0](tensor)

    def unpack(packed) -> torch.Tensor:
        if isinstance(packed, _RowRange):
            return packed.gathered.rows(packed.start, packed.stop)
        return packed.unpack() if outer is None else outer[1](packed)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return grouped_linear(rows, weight, plan, bias)
    finally:
        pending.clear()


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the kernels of `triton_kernels` may run on `x`: on CUDA with Triton 3 installed, fp32, fp16 or bf16,
    outside torch.compile, unless `MODELING_MOM_TRITON=0` (each kernel is also probed once: `kernel_works`)."""
    if x.device.type != "cuda" or torch.compiler.is_compiling() or os.environ.get("MODELING_MOM_TRITON") == "0":
        return False
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and is_triton_available("3.0.0")


def _grouped_mm_aligned(t: torch.Tensor) -> bool:
    """`grouped_mm` needs a unit stride in one of the last two dims and the other a multiple of 16 bytes."""
    rows, cols = t.stride()[-2:]
    alignment = 16 // t.element_size()
    return (cols == 1 and rows % alignment == 0) or (rows == 1 and cols % alignment == 0)


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether this torch build runs `grouped_mm` for `x`'s device and dtype (and `x @ weight`'s strides).

    With `weight`, also checks the 16-byte stride alignment `grouped_mm` requires of both operands and of the
    gradients: `in` and `out` must be multiples of 16 bytes (4 fp32 or 8 bf16 elements); `grouped_linear` pads
    features that are not (see :func:`_feature_padded_grouped_mm`).
    """
    if _GROUPED_MM is None:
        return False
    if weight is not None:
        alignment = 16 // x.element_size()
        dims_aligned = weight.shape[-2] % alignment == 0 and weight.shape[-1] % alignment == 0
        if not (dims_aligned and _grouped_mm_aligned(x) and _grouped_mm_aligned(weight)):
            return False
    if x.device.type == "cpu":  # torch.compile traces with the kernel's fake version, which takes bf16 only
        return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (`grouped_mm`'s backward rejects stride 0)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _bag_wins(num_pairs: int, weight: torch.Tensor) -> bool:
    """Whether an `embedding_bag` (`bag_mixture`) beats a grouped matmul for `num_pairs` (row, expert) products: for
    experts of at most 2^18 weights (MoEUT's 128-wide experts, SwitchHead's heads) with at most 6 rows each on
    average (decoding, short prompts). Measured on CPU (fp32, 2 threads; `benchmarks/bench_decode_path.py`) the bag
    is 1.1-3.4x faster there; they break even at 8-16 rows per expert. With larger experts (MoLM's, MoM's modules)
    the two are within 0.75-1.4x of each other at any row count (the bag spreads rows, not features, over threads),
    so those keep the grouped matmul."""
    return weight.shape[-2] * weight.shape[-1] <= 2**18 and num_pairs <= 6 * weight.shape[0]


def bag_mixture_wins(selected: torch.Tensor, weight: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """Whether a layer may compute its `[N, k]` expert choices with `bag_mixture` instead of sorting them: without
    autograd (no gradient to `weight` or `inputs`), outside autocast and compilation (which `grouped_linear`
    handles), for experts small enough for the bag (see `_bag_wins`) and at most one choice per expert on average
    (decoding). With more, sorted rows read each expert's weights while they are in cache: on MoEUT-44M (fp32, 2
    threads) the unsorted bags take 0.87-0.92x the sorted forward's time at 0.3-0.6 choices per expert, but 1.11x
    at 1.2 and 1.43x at 5 (a 64-token prompt)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (weight, *inputs))
    if needs_grad or torch.is_autocast_enabled(weight.device.type) or torch.compiler.is_compiling():
        return False
    return selected.numel() <= weight.shape[0] and _bag_wins(selected.numel(), weight)


def bag_mixture(
    x: torch.Tensor, selected: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """Without autograd, unsorted: `sum_j gates[n, j] * x[n, j] @ weight[selected[n, j]]` -> `[N, out]`.

    `x` is `[N, k, in]`, or `[N, 1, in]` for one input shared by the row's `k` experts; `selected` (experts below
    `E`: no SKIP) and `gates` (1 if None) are `[N, k]`. One `embedding_bag`: the bank is viewed as `E * in` rows of
    `out` features, and row n's bag holds its experts' rows, weighted by the gated inputs and summed. It reads only
    the chosen experts' weights, with no sort, no per-expert matmul (whose fixed cost dominates at a few rows), no
    copy of the weights and no scatter: the gate-weighted sum over a token's experts is the bag's own sum. CPU
    threads share the bags, not the rows of a bag, so with fewer rows than threads (decoding one sequence) each
    choice gets its own bag and the `k` results are summed: at MoEUT-44M's FFN down projection (1 token, 12
    experts) 0.6x the time of one bag.
    """
    num_experts, in_features, out_features = weight.shape
    bags = (selected * in_features).unsqueeze(-1) + torch.arange(in_features, device=x.device)  # [N, k, in]
    per_sample = (x if gates is None else x * gates.unsqueeze(-1).to(x.dtype)).expand(bags.shape)
    bank = weight.reshape(num_experts * in_features, out_features)
    if bags.shape[0] < torch.get_num_threads() and bags.shape[1] > 1:  # threads share bags, not a bag's rows: split
        parts = F.embedding_bag(bags.flatten(0, 1), bank, per_sample_weights=per_sample.flatten(0, 1), mode="sum")
        return parts.view(*bags.shape[:2], out_features).sum(1)
    return F.embedding_bag(bags.flatten(1), bank, per_sample_weights=per_sample.flatten(1), mode="sum")


def _padded_wins(x: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan) -> bool:
    """Whether `_padded_linear` beats a grouped matmul: bf16 on CPU, small products (at most 2^23 multiply-adds per
    expert on average, e.g. MoEUT's 128-wide experts at ~42 rows each) and padding that adds at most as many rows as
    there are. There `grouped_mm` is a loop of oneDNN matmuls with a large fixed cost each: on an AMX Xeon a
    `[42 x 1024] @ [1024 x 128]` product runs at ~110 GFLOP/s where one `bmm` of 387 of them reaches ~260 (a dense
    matmul ~800). With larger products (SwitchHead's ~200 rows per expert, MoLM's 1024 x 2048 experts) the fixed cost
    is amortised and padding only adds work; so it does in fp32, where MKL's per-expert products run as fast as
    `bmm`'s (measured: `benchmarks/bench_dispatch.py`). In training, autograd keeps the padded rows: up to twice the
    memory of the rows themselves."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.shape[0] == 0:
        return False
    macs_per_expert = x.shape[0] * weight.shape[-2] * weight.shape[-1] / plan.num_experts
    return macs_per_expert <= 2**23 and max(plan.counts) * plan.num_experts <= 2 * x.shape[0]


def _padded_linear(x: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """`grouped_linear` as one `bmm`: each expert's rows are copied into `[E, C, in]` (C = the largest count, the
    rest zeros), multiplied by `weight[E, in, out]`, and read back in sorted order."""
    capacity = max(plan.counts)
    padded = x.new_zeros(plan.num_experts * capacity, x.shape[-1]).index_copy(0, plan.padded_slots, x)
    out = torch.bmm(padded.view(plan.num_experts, capacity, -1), weight)
    return out.flatten(0, 1).index_select(0, plan.padded_slots)


def _feature_padded_grouped_mm(x: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """`grouped_mm` for features it cannot take as they are (not 16-byte multiples, such as MoEUT-44M's 82-wide
    SwitchHead heads): both operands are zero-padded to the next multiple, the padded columns multiply zeros, and
    the output's padding is sliced off (autograd pads and slices the gradients the same way). Copying the weight
    costs about one more read of it, and autograd keeps the copies: on CPU (fp32, 2 threads) MoEUT-44M trains as fast
    as with the per-expert loop or a few percent faster, with 8% more activation memory
    (`benchmarks/results/moeut-44m-feature-padding-amx.md`); on a GPU it saves one kernel launch per expert."""
    alignment = 16 // x.element_size()
    in_padding, out_features = -x.shape[-1] % alignment, weight.shape[-1]
    x = (F.pad(x, (0, in_padding)) if in_padding else x).contiguous()  # x itself if it can: `gathered_linear`'s rows
    weight = F.pad(weight, (0, -out_features % alignment, 0, in_padding)).contiguous()
    return _GROUPED_MM(x, weight, offs=plan.offsets)[:, :out_features]


def _feature_padding_wins(x: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan, needs_grad: bool) -> bool:
    """Whether `_feature_padded_grouped_mm` beats the per-expert loop. With autograd it is as fast as the loop or
    faster, and on a GPU it saves one kernel launch per expert. Without autograd on CPU (prompts) its copy of the
    weight costs more than the loop's per-expert overhead: always where the output features are padded (the copy is
    strided and the output sliced), and below ~64 rows per expert where only the input features are. Measured at
    MoEUT-44M's SwitchHead shapes (fp32, 2 threads, `benchmarks/bench_decode_path.py --feature-padding`), as the
    loop's time over the padded one's in two runs: V (412 -> 82) 0.62-0.92 without autograd at 8-512 rows per
    expert, 0.97-1.12 with it; O (82 -> 412) 0.81-0.97 without autograd at 8-32 rows, 1.12-1.36 at 64-512, 1.02-1.22
    with it (`benchmarks/results/feature-padding-amx.md` is the second run)."""
    if needs_grad or x.device.type != "cpu":
        return True
    output_aligned = weight.shape[-1] % (16 // x.element_size()) == 0
    return output_aligned and x.shape[0] >= 64 * plan.num_experts


def _triton_wins(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernel of `triton_kernels` runs the grouped matmul: where `triton_usable` allows it and torch
    has no fused `grouped_mm` kernel (its CUTLASS kernel takes bf16 on Hopper and Blackwell only; elsewhere it, like
    our fallback, launches one matmul per expert)."""
    if x.dtype != weight.dtype or not triton_usable(x):
        return False
    if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10):
        return False
    from .triton_kernels import kernel_works  # imported only where Triton is installed

    return kernel_works("grouped_linear", x.device, x.dtype)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: DispatchPlan,
    bias: torch.Tensor | None = None,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """Per-expert linear map of sorted rows: `x[S, in] @ weight[e, in, out] (+ bias[e, out])` -> `[S, out]`.

    `use_grouped_mm=None` picks `grouped_mm` when supported (see :func:`grouped_mm_supported`); `False` forces the
    per-expert `split`/`unbind` loop, which is also the reference the fast paths are tested against. Unless forced,
    on CUDA without a fused `grouped_mm` the Triton kernels run it (see :func:`_triton_wins`), small bf16 products on
    CPU run as one padded `bmm` (see :func:`_padded_wins`), features that `grouped_mm` cannot take run through it
    zero-padded where that pays (see :func:`_feature_padding_wins`), and without autograd, with a few rows per small
    expert (decoding), one `embedding_bag` over the chosen experts' weights computes every row (see
    :func:`_bag_wins`).
    """
    if torch.is_autocast_enabled(x.device.type):  # `grouped_mm` has no autocast rule: cast as a matmul would be
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    # the bag's and the padding's tests read row counts, which torch.compile could only guard on per value: compiled
    # code skips them
    choose = use_grouped_mm is not False and not torch.compiler.is_compiling()
    automatic = use_grouped_mm is None
    if automatic:
        use_grouped_mm = grouped_mm_supported(x, weight)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if choose and not needs_grad and _bag_wins(plan.token_index.shape[0], weight):
        out = bag_mixture(x.unsqueeze(1), plan.expert_index.unsqueeze(1), weight)
    elif choose and _triton_wins(x, weight):
        from .triton_kernels import triton_grouped_linear  # imported only where Triton is installed

        out = triton_grouped_linear(x, weight, plan.offsets, plan.counts)
    elif choose and _padded_wins(x, weight, plan):  # also where grouped_mm needs aligned features (MoEUT-44M's 412)
        out = _padded_linear(x, weight, plan)
    elif use_grouped_mm:
        out = _ContiguousGrad.apply(_GROUPED_MM(x, weight, offs=plan.offsets))
    elif automatic and grouped_mm_supported(x) and _feature_padding_wins(x, weight, plan, needs_grad):
        out = _feature_padded_grouped_mm(x, weight, plan)  # the build has grouped_mm, but the features are unaligned
    else:
        out = torch.cat([xe @ we for xe, we in zip(x.split(plan.counts), weight.unbind(0))])
    if bias is not None:
        out = out + bias.index_select(0, plan.expert_index)
    return out


def expert_mlp(
    x: torch.Tensor,
    plan: DispatchPlan,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
    gates: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens `[T, d]` -> `[T, d]`: for each token, the sum over its experts of
    `gate * (act(x @ up_proj[e] + up_bias[e]) @ down_proj[e] + down_bias[e])` (`gates` `[T, k]`; None: weight 1).

    The experts read `x`'s rows, gathered by `gathered_linear` (not kept for the backward pass), or `rows`, sorted
    rows `[S, d]` computed by the caller (MoM's per-module LayerNorm). The gate multiplies the narrower of the
    expert's hidden `[S, inner]` and its output `[S, d]`, the same product: MoEUT's 128-wide experts gate 8x fewer
    numbers than their 1024-wide output.
    """
    if rows is None:
        hidden = act_fn(gathered_linear(x, up_proj, plan, up_bias))
    else:
        hidden = act_fn(grouped_linear(rows, up_proj, plan, up_bias))
    if gates is None or hidden.shape[-1] >= down_proj.shape[-1]:
        return scatter_rows(grouped_linear(hidden, down_proj, plan, down_bias), plan, x.shape[0], gates)
    gates = sorted_gates(gates, plan).to(hidden.dtype)  # [S, 1]
    out = grouped_linear(hidden * gates, down_proj, plan)
    if down_bias is not None:
        out = out + gates * down_bias.index_select(0, plan.expert_index)
    return scatter_rows(out, plan, x.shape[0])
