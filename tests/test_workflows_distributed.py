"""`mom pretrain` under `accelerate launch` with 2 CPU processes (DDP over gloo) on a tiny routed model.

Each optimizer step sees the same 4 blocks whether they come as one batch of 4 or as 2 processes x 2, so with
synchronised gradients both steps' language-modelling losses must agree within 1e-5 (fp32; means are taken in another
order). The second step's loss shows the first update was the whole batch's: two processes that did not average
their gradients would each have stepped on half of it. Hence no router balancing loss (its coefficient is 0: the loss
is a nonlinear function of its batch, which DDP computes per process, so it would legitimately change the update) and
no dropout (the conversion carries GPT-2's rates over, and each process would draw its own masks).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from modeling_mom.workflows import embedded_data, pretrain
from modeling_mom.workflows.convert import converters

from .test_workflows import subprocess_env


@pytest.fixture(scope="module")
def routed_model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = embedded_data.build_tokenizer()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_inner=128, n_layer=12, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    arch, converter = next(iter(converters().items()))
    model = converter.convert(gpt2)
    model.config.router_aux_loss_coef = 0.0  # computed and logged, not trained on (module docstring)
    model.save_pretrained(root / arch)
    tokenizer.save_pretrained(root / arch)
    corpus = embedded_data.write_jsonl([{"text": t} for t in embedded_data.corpus(40)], root / "corpus.jsonl")
    return root / arch, Path(corpus)


def command(model: Path, corpus: Path, out: Path, batch_size: int) -> list[str]:
    return ["pretrain", "--model", str(model), "--dataset", str(corpus), "--block-size", "32", "--eval-blocks", "0",
            "--out", str(out), "--max-steps", "2", "--batch-size", str(batch_size), "--warmup-steps", "0",
            "--logging-steps", "1", "--save-steps", "2", "--no-progress"]


def logged(out: Path) -> list[dict]:
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_accelerate_launch_with_two_processes_trains_one_model(routed_model, tmp_path):
    model, corpus = routed_model
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "modeling_mom.workflows.cli"]
    subprocess.run([*launch, *command(model, corpus, tmp_path / "ddp", batch_size=2)],
                   env=subprocess_env(tmp_path, package=True), cwd=tmp_path, check=True)
    history = json.loads((tmp_path / "ddp" / "final" / "mom_history.json").read_text())
    assert history[-1]["batch_size"] == 4  # 2 processes x 2 blocks: one data-parallel run, not two copies
    AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final")

    pretrain.main(command(model, corpus, tmp_path / "single", batch_size=4)[1:])
    distributed, single = logged(tmp_path / "ddp"), logged(tmp_path / "single")
    assert all("aux_loss" in entry for entry in distributed)
    assert len(distributed) == len(single) == 2
    assert [e["lm_loss"] for e in distributed] == pytest.approx([e["lm_loss"] for e in single], abs=1e-5)
