"""Distributed training: the tensor-parallel styles (`from_pretrained(..., distributed_config=DistributedConfig(
tp_size=N))`) of expert banks and of attention split by heads, the expert-parallel plan (`ep_size=N`, transformers'
own styles), and telling sharded weights.

Expert banks stored `[E, in, out]` (the layout transformers calls `is_transposed`) are split by each expert's inner
features: each rank runs every expert on its slice, and the ranks' partial outputs are summed, as transformers'
"moe_tp_experts" does; here also right for experts whose down projection has a bias, which belongs to no slice and
must join the sum once. Attention split by heads is the Megatron-LM region: each rank runs its heads (their
projections, experts and routers) on the replicated input, the input's gradient and the output are summed over the
ranks, and the output bias joins once. Whatever no plan entry names (norms, the FFN router) is replicated: every rank
computes it identically.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import is_torch_distributed_available

DISTRIBUTED = is_torch_distributed_available()  # read once: the check is cached, which torch.compile warns about
if DISTRIBUTED:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    from transformers.distributed.tensor_parallel import MoeExpertsParallel, TensorParallelLayer

EXPERTS_STYLE = "moe_tp_experts_with_bias"
HEADS_PARAMETER_STYLE = "split_by_heads"  # a parameter whose first dim lists heads or each head's experts
ATTENTION_STYLE = "attention_heads_region"
ROUTER_STYLE = "heads_router_gathered_logits"


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor: a shard of a parameter that FSDP2 gathers only for its module's call, or that
    tensor parallelism splits."""
    return DISTRIBUTED and isinstance(tensor, DTensor)


def experts_tp_plan(experts: str, up: str, down: str, up_bias: str | None) -> dict[str, str]:
    """Plan entries that split every expert of the module `experts` over the ranks by its inner features.

    transformers' weight styles shard a fixed dim: "rowwise" the last (`up` `[E, d, f]` and its bias `[E, f]`: by f),
    "colwise" the second to last (`down` `[E, f, d]`: by f). `up_bias` is the up projection's bias, if any.
    """
    plan = {f"{experts}.{up}": "rowwise", f"{experts}.{down}": "colwise", experts: EXPERTS_STYLE}
    if up_bias is not None:
        plan[f"{experts}.{up_bias}"] = "rowwise"
    return plan


def experts_ep_plan(experts: str, banks: list[str]) -> dict[str, str]:
    """Plan entries that give each rank whole experts of the module `experts` (expert parallelism,
    `DistributedConfig(ep_size=N)`): transformers' own styles, which fit any module with its experts contract.
    "grouped_gemm" splits each of the `banks` (`[E, ...]` weights and biases) by expert, and sets the module's
    `num_experts` to the rank's count; "ep_dispatch_experts" sends each (token, expert) choice to the expert's rank
    and its output back to the token's rank, which weights it by its gate. Choices of another rank's experts reach
    `forward` as ids at or above `num_experts` with gate 0 (at inference, when the ranks share a batch), which the
    dispatch drops."""
    return {experts: "ep_dispatch_experts"} | {f"{experts}.{bank}": "grouped_gemm" for bank in banks}


def attention_tp_plan(attention: str, heads: list[str], head_inputs: list[str], routers: list[str]) -> dict[str, str]:
    """Plan entries that split the attention module `attention` by heads (its forward takes the query and value inputs
    first and returns `(output, attention weights)`; `num_heads` and `output_bias` are attributes): `heads` are its
    parameters whose first dim lists heads or each head's experts, `head_inputs` those whose last dim does (a dense
    output projection's weight), `routers` its per-head routers, whose logits every rank needs whole."""
    plan = {f"{attention}.{name}": HEADS_PARAMETER_STYLE for name in heads}
    plan |= {f"{attention}.{name}": "rowwise" for name in head_inputs}
    plan |= {f"{attention}.{name}": ROUTER_STYLE for name in routers}
    return plan | {attention: ATTENTION_STYLE}


@contextlib.contextmanager
def zeroed(module: nn.Module, parameter: torch.Tensor | None):
    """Within the block, `parameter` (of `module` or a submodule; nothing if None) reads as zeros."""
    if parameter is None:
        yield
        return
    owner, name = next((m, n) for m in module.modules() for n, p in m._parameters.items() if p is parameter)
    owner._parameters[name] = torch.zeros_like(parameter)
    try:
        yield
    finally:
        owner._parameters[name] = parameter


@contextlib.contextmanager
def local_parameters(module: nn.Module):
    """Within the block, every sharded parameter of `module` and its submodules reads as this rank's shard."""
    swapped = [
        (owner, name, param)
        for owner in module.modules()
        for name, param in owner._parameters.items()
        if is_sharded(param)
    ]
    for owner, name, param in swapped:
        owner._parameters[name] = param.to_local()
    try:
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


if DISTRIBUTED:

    class ExpertsWithBiasParallel(MoeExpertsParallel):
        """transformers' "moe_tp_experts" (replicated tokens and gates in, each rank's partial output summed), for
        experts with biases too (`has_bias`): the down projection's bias (`down_proj_bias` `[E, d]`, replicated) is
        left out of the ranks' parts and added once to the sum, as the gate-weighted bias of each token's chosen
        experts. Every rank adds the same term, so the bias gets its whole gradient on every rank, as replicated
        parameters must."""

        def install_forward(self, module, mesh):
            super().install_forward(module, mesh)
            summed_forward = module.forward

            def forward(hidden_states, top_k_index, top_k_weights):
                if not module.has_bias:
                    return summed_forward(hidden_states, top_k_index, top_k_weights)
                bias = module.down_proj_bias
                with zeroed(module, bias):
                    output = summed_forward(hidden_states, top_k_index, top_k_weights)
                weights = top_k_weights.to(bias.dtype)
                return output + F.embedding_bag(top_k_index, bias, per_sample_weights=weights, mode="sum")

            module.forward = forward
            return module

    # transformers has these two collectives too, but private (`parallel_utils._AllReduce*`, moved in v5.21)
    class SumGradients(torch.autograd.Function):
        """Identity; the backward sums the gradient over the ranks (a replicated input that each rank's shards read
        only in part)."""

        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
            return grad, None

    class SumOutputs(torch.autograd.Function):
        """Sums the ranks' partial outputs; the backward passes the (replicated) gradient to each rank's part."""

        @staticmethod
        def forward(ctx, x, group):
            x = torch.clone(x, memory_format=torch.contiguous_format)  # the sum is in place; keep autograd's input
            dist.all_reduce(x, group=group)
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    class HeadsParameter(TensorParallelLayer):
        """A parameter split by its first dim, which lists heads or each head's experts (head-major)."""

        def shard_param(self, module, param, mesh):
            meta = module._parameters.get(param)
            if meta is not None:
                sharded = distribute_tensor(meta, mesh, [Shard(0)], src_data_rank=None)
                module._parameters[param] = nn.Parameter(sharded, requires_grad=meta.requires_grad)

    class AttentionHeadsParallel(TensorParallelLayer):
        """Attention split by heads (see the module docstring): the query and value inputs (`args[0]`, `args[1]`)
        enter with summed gradients, the module runs on its parameters' shards with its output bias at zero, and the
        output is summed over the ranks before the bias is added once."""

        def install_forward(self, module, mesh):
            if module.num_heads % mesh.size():
                raise ValueError(
                    f"Tensor parallelism splits attention by heads: num_attention_heads={module.num_heads} is not "
                    f"divisible by tp_size={mesh.size()}; use a tp_size that divides it."
                )
            group, heads_forward = mesh.get_group(), module.forward

            def forward(query_input, value_input, *args, **kwargs):
                query_input, value_input = (SumGradients.apply(x, group) for x in (query_input, value_input))
                bias = module.output_bias
                with local_parameters(module), zeroed(module, bias):
                    output, attention_weights = heads_forward(query_input, value_input, *args, **kwargs)
                output = SumOutputs.apply(output, group)
                return (output if bias is None else output + bias), attention_weights

            module.forward = forward
            return module

    class GatheredRouterLogits(TensorParallelLayer):
        """A router split by heads with its attention: the logits it returns first (`[N, heads, choices]`, for the
        router losses) are gathered from all ranks, so that every rank computes the same losses."""

        def install_forward(self, module, mesh):
            router_forward = module.forward

            def forward(hidden_states):
                logits, *rest = router_forward(hidden_states)
                logits = DTensor.from_local(logits, mesh, [Shard(1)], run_check=False).full_tensor()
                return logits, *rest

            module.forward = forward
            return module

    ALL_PARALLEL_STYLES.register(EXPERTS_STYLE, ExpertsWithBiasParallel())
    ALL_PARALLEL_STYLES.register(HEADS_PARAMETER_STYLE, HeadsParameter())
    ALL_PARALLEL_STYLES.register(ATTENTION_STYLE, AttentionHeadsParallel())
    ALL_PARALLEL_STYLES.register(ROUTER_STYLE, GatheredRouterLogits())
