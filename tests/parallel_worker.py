"""One rank of `test_parallelism.py`, run under `torch.distributed.run` (gloo, CPU).

For each checkpoint directory given and each way of splitting it over the ranks (`PARALLELISMS`: tensor parallelism,
FSDP2, and expert parallelism beside either), the rank loads the model split and whole, runs both on the same batch
(the same on every rank, as tensor parallelism needs; FSDP averages the ranks' gradients, which are then the whole
batch's), and writes what it measured to `<dir>/<parallelism>_rank<r>.json`:
- the largest logit, loss and router-loss differences;
- the largest gradient difference relative to the parameter's largest gradient (sharded gradients gathered; a
  gradient below 1e-6 of the model's largest counts as that: e.g. a key bias', 0 in exact arithmetic, as a softmax
  ignores a constant added to all of a query's logits);
- whether greedy decoding gave the same tokens, with the dynamic cache and (but for ModuleFormer) the static one;
- the local and whole shapes of the sharded parameters, and the names of the others;
- whether a checkpoint saved from the split model reloads (whole) with the original weights.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import modeling_mom  # noqa: F401  (registers the model types with the auto classes)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


PARALLELISMS = {  # name -> the DistributedConfig sizes, each set to the world size
    "tensor": ["tp_size"],
    "fsdp": ["fsdp_size"],
    "expert": ["tp_size", "ep_size"],
    "expert_fsdp": ["fsdp_size", "ep_size"],
}


def parallelisms(config) -> list[str]:
    """MoM has no experts to split; ModuleFormer refuses expert parallelism beside FSDP (its router is stored in the
    experts module)."""
    if not config.base_model_ep_plan:
        return ["tensor", "fsdp"]
    return [name for name in PARALLELISMS if not (name == "expert_fsdp" and config.model_type == "moduleformer")]


def compare(path: Path, parallelism: str, world_size: int) -> dict:
    config = DistributedConfig(**dict.fromkeys(PARALLELISMS[parallelism], world_size))
    split = AutoModelForCausalLM.from_pretrained(path, distributed_config=config)
    whole = AutoModelForCausalLM.from_pretrained(path)
    split.train(), whole.train()  # the router losses join the loss in training
    vocab = whole.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    outputs = [model(input_ids, labels=input_ids, output_router_logits=True) for model in (split, whole)]
    for output in outputs:
        output.loss.backward()
    pairs = list(zip(split.parameters(), whole.parameters(), strict=True))
    floor = 1e-6 * max(reference.grad.abs().max() for _, reference in pairs)  # a key bias' gradient: 0 but rounding
    gradient_error = max(
        ((full(param.grad) - reference.grad).abs().max() / reference.grad.abs().max().clamp_min(floor)).item()
        for param, reference in pairs
    )
    split.eval(), whole.eval()
    prompt = input_ids[:1, :5]
    # ModuleFormer refuses fixed-size caches (its attention reads every cached key)
    caches = ("dynamic",) if whole.config.model_type == "moduleformer" else ("dynamic", "static")
    tokens = [
        [model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation=cache).tolist()
         for model in (split, whole)]
        for cache in caches
    ]
    saved = path / f"saved_from_{parallelism}"
    split.save_pretrained(saved)
    dist.barrier()
    reloaded = dict(AutoModelForCausalLM.from_pretrained(saved).state_dict())
    return {
        "logits": (outputs[0].logits - outputs[1].logits).abs().max().item(),
        "loss": abs(outputs[0].loss.item() - outputs[1].loss.item()),
        "aux_loss": abs(outputs[0].aux_loss.item() - outputs[1].aux_loss.item()),
        "gradient": gradient_error,
        "same_tokens": all(split_tokens == whole_tokens for split_tokens, whole_tokens in tokens),
        "sharded": {
            name: [list(param.to_local().shape), list(param.shape)]
            for name, param in split.named_parameters()
            if isinstance(param, DTensor)
        },
        "whole": [name for name, param in split.named_parameters() if not isinstance(param, DTensor)],
        "saved_equal": all(torch.equal(reloaded[k], v) for k, v in whole.state_dict().items()),
    }


def main(directories: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for directory in map(Path, directories):
        for parallelism in parallelisms(AutoConfig.from_pretrained(directory)):
            result = compare(directory, parallelism, world_size)
            (directory / f"{parallelism}_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
