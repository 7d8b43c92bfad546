"""Distributed training: tensor parallelism (`from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`)
for expert banks stored `[E, in, out]`, the layout transformers calls `is_transposed`, and telling sharded weights.

Each rank keeps a slice of every expert's inner features (the up projection's outputs, the down projection's
inputs), runs the experts on its slices, and the ranks' partial outputs are summed: transformers' "moe_tp_experts",
here also right for experts whose down projection has a bias, which belongs to no slice and must join the sum once.
Routers, attention and norms stay replicated: every rank computes them identically.
"""

import torch
import torch.nn.functional as F
from transformers.utils import is_torch_distributed_available

if is_torch_distributed_available():
    from torch.distributed.tensor import DTensor
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    from transformers.distributed.tensor_parallel import MoeExpertsParallel

EXPERTS_STYLE = "moe_tp_experts_with_bias"


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor: a shard of a parameter that FSDP2 gathers only for its module's call, or that
    tensor parallelism splits."""
    return is_torch_distributed_available() and isinstance(tensor, DTensor)


def experts_tp_plan(experts: str, up: str, down: str, up_bias: str | None) -> dict[str, str]:
    """Plan entries that split every expert of the module `experts` over the ranks by its inner features.

    transformers' weight styles shard a fixed dim: "rowwise" the last (`up` `[E, d, f]` and its bias `[E, f]`: by f),
    "colwise" the second to last (`down` `[E, f, d]`: by f). `up_bias` is the up projection's bias, if any.
    """
    plan = {f"{experts}.{up}": "rowwise", f"{experts}.{down}": "colwise", experts: EXPERTS_STYLE}
    if up_bias is not None:
        plan[f"{experts}.{up_bias}"] = "rowwise"
    return plan


if is_torch_distributed_available():

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
                name = next(name for name, param in module._parameters.items() if param is bias)
                module._parameters[name] = torch.zeros_like(bias)
                try:
                    output = summed_forward(hidden_states, top_k_index, top_k_weights)
                finally:
                    module._parameters[name] = bias
                weights = top_k_weights.to(bias.dtype)
                return output + F.embedding_bag(top_k_index, bias, per_sample_weights=weights, mode="sum")

            module.forward = forward
            return module

    ALL_PARALLEL_STYLES.register(EXPERTS_STYLE, ExpertsWithBiasParallel())
