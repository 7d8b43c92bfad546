"""Parallelism on 2 CPU processes (gloo): `from_pretrained(path, distributed_config=DistributedConfig(...))` with
`tp_size=2` (tensor parallelism: MoEUT's attention split by heads and its FFN experts by their inner features,
ModuleFormer's FFN experts likewise, the vocabulary of all three) or `fsdp_size=2` (FSDP2: every parameter sharded,
gathered per decoder layer), each also with `ep_size=2` (expert parallelism, MoEUT and ModuleFormer: each rank holds
half of every FFN layer's experts, whole, and transformers' all-to-all brings them their tokens; at inference beside
tensor parallelism each rank runs its experts on the shared batch, other ranks' choices masked, and the outputs are
summed; ModuleFormer refuses it beside FSDP), and the split model computes what the whole one does.

Each case is a checkpoint a user would have: MoEUT as in the paper (no biases; SwitchHead, and the one-expert
output-gate variant with biases) and the GPT-2 conversions of all three architectures (biased experts and attention,
tied head for MoM), whose biases are randomised so that the bias paths are exercised. `parallel_worker.py` runs both
forms on each rank and reports. Tolerances: the tensor-parallel model sums heads, each expert's inner features and
the vocabulary's log-sum-exp in two parts, so fp32 results differ by rounding only: logits, loss and router loss
within 1e-5 (measured up to 5e-7), every gradient within 2e-5 of its parameter's largest (measured up to 5.2e-6,
through 12 layers), and greedy decoding gives the same tokens (dynamic and static cache). (Without adding the
biases of an expert's or of the attention's output once, after the ranks' sum, as transformers' "moe_tp_experts"
and a plain region would not, the logits differ by 0.44 to 1.04.) FSDP gathers whole weights and computes the
forward in the same order (logits and losses measured equal); its gradients are the ranks' averaged by the
reduce-scatter (measured within 1.3e-6), under the same bounds. Expert parallelism sums each token's experts in
another order: logits within 5.4e-7, gradients within 5.7e-6 (measured).
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.distributed import DistributedConfig
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

from modeling_mom import ModuleFormerForCausalLM, MoEUTConfig, MoEUTForCausalLM
from modeling_mom.moe_tensor_parallel import ATTENTION_STYLE
from modeling_mom.workflows.convert import converters

from .parallel_worker import parallelisms
from .test_workflows import subprocess_env

WORKER = Path(__file__).with_name("parallel_worker.py")
WORLD_SIZE = 2


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_inner=256, n_layer=12, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))


def randomise_biases(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.normal_(std=0.1)
    return model


def paper_moeut(**overrides) -> MoEUTForCausalLM:
    torch.manual_seed(0)
    return MoEUTForCausalLM(MoEUTConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=4, num_unique_layers=2, num_attention_heads=2, head_dim=16,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, **overrides,
    ))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    root = tmp_path_factory.mktemp("parallelism")
    models = {"moeut-paper": paper_moeut(), "moeut-output-gate": randomise_biases(
        paper_moeut(num_attention_experts=1, attention_bias=True, mlp_bias=True))}
    for arch, converter in converters().items():
        models[f"{arch}-from-gpt2"] = randomise_biases(converter.convert(tiny_gpt2()))
    for name, model in models.items():
        model.save_pretrained(root / name)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE), str(WORKER)]
    subprocess.run([*launch, *(str(root / name) for name in models)],
                   env=subprocess_env(root, package=True), cwd=root, check=True)
    return {
        (name, parallelism): [
            json.loads((root / name / f"{parallelism}_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)
        ]
        for name, model in models.items()
        for parallelism in parallelisms(model.config)  # each one's reports must exist
    }


def test_the_split_model_computes_what_the_whole_model_does(results):
    for name, ranks in results.items():
        for rank, result in enumerate(ranks):
            assert max(result["logits"], result["loss"], result["aux_loss"]) < 1e-5, (name, rank, result)
            assert result["gradient"] < 2e-5, (name, rank, result)
            assert result["same_tokens"], (name, rank)


SPLIT_DIMS = {  # parameter name suffix -> the dim tensor parallelism splits
    "all": {"embed_tokens.weight": 0},
    "moeut": {"mlp.experts.up_proj": 2, "mlp.experts.down_proj": 1, "attention.q_proj.weight": 0,
              "attention.k_proj.weight": 0},
    "moeut-switchhead": {"attention.v_experts": 0, "attention.o_experts": 0, "attention.v_router.weight": 0,
                         "attention.o_router.weight": 0},
    "moeut-output-gate": {"attention.v_proj.weight": 0, "attention.o_proj.weight": 1, "attention.o_gate": 0},
    "moduleformer": {"mlp.input_proj": 2, "mlp.output_proj": 1},
}


def test_tensor_parallelism_splits_heads_experts_and_vocabulary(results):
    for (name, parallelism), ranks in results.items():
        if parallelism != "tensor":
            continue
        arch = name.split("-")[0]
        variant = "moeut-output-gate" if name == "moeut-output-gate" else "moeut-switchhead"
        expected = SPLIT_DIMS["all"] | SPLIT_DIMS.get(arch, {}) | (SPLIT_DIMS[variant] if arch == "moeut" else {})
        sharded = ranks[0]["sharded"]
        for suffix, dim in expected.items():
            shapes = [shape for key, shape in sharded.items() if key.endswith(suffix)]
            assert shapes, (name, suffix, sorted(sharded))
            for local, whole in shapes:
                assert local[dim] * WORLD_SIZE == whole[dim], (name, suffix, local, whole)
                assert local[:dim] + local[dim + 1 :] == whole[:dim] + whole[dim + 1 :], (name, suffix)


EXPERT_BANKS = {"moeut": ("mlp.experts.up_proj", "mlp.experts.down_proj"),
                "moduleformer": ("mlp.input_proj", "mlp.output_proj")}


def test_expert_parallelism_gives_each_rank_whole_experts(results):
    for (name, parallelism), ranks in results.items():
        if not parallelism.startswith("expert"):
            continue
        sharded = ranks[0]["sharded"]
        for suffix in EXPERT_BANKS[name.split("-")[0]]:
            shapes = [shape for key, shape in sharded.items() if key.endswith(suffix)]
            assert shapes, (name, parallelism, suffix)
            for local, whole in shapes:
                assert local[0] * WORLD_SIZE == whole[0] and local[1:] == whole[1:], (name, suffix, local, whole)


def test_each_model_with_experts_ran_expert_parallel(results):
    ran = {(name.split("-")[0], parallelism) for name, parallelism in results}
    assert {("moeut", "expert"), ("moeut", "expert_fsdp"), ("moduleformer", "expert")} <= ran, sorted(ran)


def test_moduleformer_refuses_expert_parallelism_beside_fsdp():
    config = DistributedConfig(fsdp_size=2, ep_size=2)
    with pytest.raises(ValueError, match=r"expert parallelism \(ep_size=2\) runs with tensor parallelism only"):
        ModuleFormerForCausalLM.maybe_distribute_model(None, config, mesh_manager=None)


def test_heads_that_do_not_divide_over_the_ranks_are_refused():
    attention = MoEUTForCausalLM(MoEUTConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=3, head_dim=16, num_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=32,
    )).model.layers[0].attention
    mesh = SimpleNamespace(size=lambda: 2)  # what the check reads of a device mesh
    with pytest.raises(ValueError, match=r"num_attention_heads=3 is not divisible by tp_size=2"):
        ALL_PARALLEL_STYLES[ATTENTION_STYLE].install_forward(attention, mesh)


def test_fsdp_shards_every_parameter(results):
    for (name, parallelism), ranks in results.items():
        if parallelism == "fsdp":
            assert ranks[0]["sharded"] and not ranks[0]["whole"], (name, ranks[0]["whole"])


def test_a_checkpoint_saved_from_the_split_model_is_the_whole_model(results):
    for name, ranks in results.items():
        assert all(result["saved_equal"] for result in ranks), name
