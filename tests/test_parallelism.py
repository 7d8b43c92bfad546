"""Parallelism on 2 CPU processes (gloo): `from_pretrained(path, distributed_config=DistributedConfig(...))` with
`tp_size=2` (tensor parallelism: every FFN expert of MoEUT and ModuleFormer split by its inner features, and the
vocabulary of all three) or `fsdp_size=2` (FSDP2: every parameter sharded, gathered per decoder layer), and the split
model computes what the whole one does.

Each case is a checkpoint a user would have: MoEUT as in the paper (no biases) and the GPT-2 conversions of all three
architectures (biased experts, tied head for MoM), whose biases are randomised so that the bias path is exercised.
`parallel_worker.py` runs both forms on each rank and reports. Tolerances: the tensor-parallel model sums each
expert's inner features in two halves and the vocabulary's log-sum-exp over two shards, so fp32 results differ by
rounding only: logits, loss and router loss within 1e-5 (measured up to 5e-7), every gradient within 2e-5 of its
parameter's largest (measured up to 3.9e-6, through 12 layers), and greedy decoding gives the same tokens. (With
transformers' own "moe_tp_experts", which adds a biased expert's output bias on every rank, the ModuleFormer
conversion's logits differ by 0.44.) FSDP gathers whole weights and computes in the same order: measured equal.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_mom import MoEUTConfig, MoEUTForCausalLM
from modeling_mom.workflows.convert import converters

from .test_workflows import subprocess_env

WORKER = Path(__file__).with_name("parallel_worker.py")
WORLD_SIZE = 2
PARALLELISMS = ("tensor", "fsdp")


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


def paper_moeut() -> MoEUTForCausalLM:
    torch.manual_seed(0)
    return MoEUTForCausalLM(MoEUTConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=4, num_unique_layers=2, num_attention_heads=2, head_dim=16,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
    ))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    root = tmp_path_factory.mktemp("parallelism")
    models = {"moeut-paper": paper_moeut()}
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
        for name in models
        for parallelism in PARALLELISMS
    }


def test_the_split_model_computes_what_the_whole_model_does(results):
    for name, ranks in results.items():
        for rank, result in enumerate(ranks):
            assert max(result["logits"], result["loss"], result["aux_loss"]) < 1e-5, (name, rank, result)
            assert result["gradient"] < 2e-5, (name, rank, result)
            assert result["same_tokens"], (name, rank)


def test_tensor_parallelism_splits_every_expert_and_the_vocabulary(results):
    expert_banks = {"moeut": ("mlp.experts.up_proj", "mlp.experts.down_proj"), "moduleformer": ("mlp.input_proj",
                                                                                                 "mlp.output_proj")}
    for (name, parallelism), ranks in results.items():
        if parallelism != "tensor":
            continue
        sharded = ranks[0]["sharded"]
        assert "model.embed_tokens.weight" in sharded, name
        vocab_local, vocab = sharded["model.embed_tokens.weight"][0][0], sharded["model.embed_tokens.weight"][1][0]
        assert vocab_local == vocab // WORLD_SIZE, (name, sharded)
        arch = name.split("-")[0]
        for bank in expert_banks.get(arch, ()):
            banks = {k: v for k, v in sharded.items() if k.endswith(bank)}
            assert banks, (name, bank, sorted(sharded))
            for local, whole in banks.values():
                inner = -1 if bank.endswith(("up_proj", "input_proj")) else -2
                assert local[inner] * WORLD_SIZE == whole[inner] and local[:inner] == whole[:inner], (name, bank)


def test_fsdp_shards_every_parameter(results):
    for (name, parallelism), ranks in results.items():
        if parallelism == "fsdp":
            assert ranks[0]["sharded"] and not ranks[0]["whole"], (name, ranks[0]["whole"])


def test_a_checkpoint_saved_from_the_split_model_is_the_whole_model(results):
    for name, ranks in results.items():
        assert all(result["saved_equal"] for result in ranks), name
