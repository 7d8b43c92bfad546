"""The analytic side of the benchmarks: FLOP counts checked against counts derived by hand, and the device and dtype
each run gets, and a smoke run of the dispatch benchmark (no timed assertions)."""

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.bench_dispatch import SHAPES, build_layer
from benchmarks.bench_dispatch import main as bench_dispatch_main
from benchmarks.bench_models import FLOP_FORMULAS, forward_flops_per_token, train_flops_per_token
from benchmarks.common import setup
from benchmarks.run_suite import main as run_suite_main
from benchmarks.run_suite import section_runs
from modeling_mom import ModuleFormerConfig, ModuleFormerForCausalLM, MoEUTConfig, MoEUTForCausalLM


def test_gpt2_forward_flops_per_token_match_the_hand_count():
    """Per token: 2 x (12 d^2 per layer + the d x vocab head) for the matmuls, and 4 T d per layer for attention's
    scores and mixing (T = the sequence length, counted over the full square as torch does)."""
    layers, d, vocab, seq = 2, 64, 100, 32
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=vocab, n_positions=seq))
    model.set_attn_implementation("sdpa")
    expected = 2 * (layers * 12 * d * d + d * vocab) + layers * 4 * seq * d
    assert forward_flops_per_token(model, torch.randint(vocab, (1, seq))) == expected


@pytest.mark.parametrize("tokens", [2, 8, 128], ids=["unsorted_bags", "embedding_bag", "grouped_mm"])
def test_expert_dispatch_flops_are_the_useful_flops(tokens):
    """One expert FFN costs 2 x 2 x d x e per chosen expert, 4 T k d e in all, whichever path computes it: unsorted
    bags (at most one choice per expert), one weighted `embedding_bag` per projection of the sorted rows (up to 6
    rows per expert, as in decoding) or the grouped matmuls (more rows)."""
    d, num_experts, width, k = 32, 6, 16, 2
    experts = build_layer(d, num_experts, width, k, "relu", torch.float32)
    index = torch.rand(tokens, num_experts).topk(k, dim=-1).indices
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        experts(torch.randn(tokens, d), index, torch.rand(tokens, k))
    assert counter.get_total_flops() == 4 * tokens * k * d * width
    dense = nn.Linear(d, width, bias=False)
    with FlopCounterMode(display=False) as counter:
        dense(torch.randn(tokens, d))
    assert counter.get_total_flops() == 2 * tokens * d * width  # the convention the formulas follow


@pytest.mark.parametrize("architecture", ["gpt2", "moeut", "moduleformer"])
def test_a_training_step_counts_every_backward_product(architecture):
    """Every product's backward computes two products of its size (the input's and the weight's gradients), grouped
    matmuls included, and SDPA's backward five (the scores recomputed, then the gradients of the probabilities, q, k
    and v) against its forward's two: a training step is 3x the forward's FLOPs plus half of SDPA's. Less means some
    backward kernel went uncounted. (ModuleFormer's stick-breaking attention is plain products. The counts are of
    the products run, so MoEUT's heads are 16 wide here: unaligned ones are zero-padded in training only.)"""
    common = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
    model = {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
                                                   attn_pdrop=0.0)),  # as the benchmarks' baselines: SDPA's kernel
        "moeut": lambda: MoEUTForCausalLM(MoEUTConfig(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                                      moe_intermediate_size=16, head_dim=16, **common)),
        "moduleformer": lambda: ModuleFormerForCausalLM(ModuleFormerConfig(num_hidden_layers=2, **common)),
    }[architecture]()  # fmt: skip
    input_ids = torch.randint(100, (2, 64))  # 128 rows: the grouped matmuls, not decoding's bags
    forward = forward_flops_per_token(model, input_ids) * input_ids.numel()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(input_ids=input_ids)
    sdpa = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))
    assert (sdpa > 0) == (architecture != "moduleformer")
    train = train_flops_per_token(model, input_ids) * input_ids.numel()
    assert train == pytest.approx(3 * forward + sdpa / 2, rel=1e-12)


@pytest.mark.parametrize("device", ["cuda", "mps", "not-a-device"])
def test_setup_refuses_a_device_this_torch_cannot_use(device):
    if device != "not-a-device" and torch.accelerator.is_available():
        pytest.skip(f"this machine has an accelerator ({torch.accelerator.current_accelerator()})")
    with pytest.raises(ValueError, match=f"--device='{device}'"):
        setup(threads=1, malloc="default", device=device)
    assert torch.get_default_device().type == "cpu"


def test_setup_on_the_cpu_adds_no_function_mode():
    """`torch.set_default_device` installs a function mode that every operator then passes through, even for "cpu":
    on the CPU the benchmarks must time the operators alone."""
    from torch.overrides import _get_current_function_mode_stack

    setup(threads=torch.get_num_threads(), malloc="default", device="cpu")
    assert not _get_current_function_mode_stack()


def test_the_suite_refuses_a_missing_device_before_running_any_section(tmp_path, capsys):
    if torch.accelerator.is_available():
        pytest.skip(f"this machine has an accelerator ({torch.accelerator.current_accelerator()})")
    with pytest.raises(SystemExit):
        run_suite_main(["--device", "cuda", "--out", str(tmp_path / "suite")])
    assert "--device='cuda'" in capsys.readouterr().err
    assert not (tmp_path / "suite").exists()


def test_the_suite_runs_every_section_in_each_dtype_on_an_accelerator():
    """On the CPU bf16 runs only where a section lists it (fp32 everywhere); on a GPU each section runs once per
    dtype, with its own larger shapes."""
    assert section_runs("models", ["fp32"], "cpu") == [("bench_models", ["--dtype", "fp32"])]
    on_gpu = section_runs("dispatch", ["bf16", "fp32"], "cuda")
    assert [(module, extra[-2:]) for module, extra in on_gpu] == [
        ("bench_dispatch", ["--dtype", "bf16"]), ("bench_dispatch", ["--dtype", "fp32"])
    ]  # fmt: skip
    assert all("--tokens" in extra for _, extra in on_gpu)


def test_the_dispatch_benchmark_runs_every_case_and_matches_the_loop(tmp_path, monkeypatch):
    """Every case of `bench_dispatch` at its tiny shapes (a smoke test of the script: it calls model internals, such
    as SwitchHead's `_values`, whose signatures the models' tests do not pin), and each case's fast path equals the
    per-expert loop (fp32; 1e-5 covers the different summation order at these widths)."""
    out = tmp_path / "dispatch.json"
    argv = ["bench_dispatch", "--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    bench_dispatch_main()
    report = json.loads(out.read_text())
    assert set(report["max_difference_vs_loop"]) == set(SHAPES)
    assert max(report["max_difference_vs_loop"].values()) < 1e-5
    assert {result["case"] for result in report["results"]} >= set(SHAPES)


def test_the_memory_report_counts_each_model_against_its_baseline(tmp_path, monkeypatch):
    """`bench_models --memory` at tiny shapes: every model of the asked pairs, with its baseline, and the sizes are
    those `activation_bytes` counts (the saved tensors of one training forward)."""
    from benchmarks.bench_models import main as bench_models_main

    out = tmp_path / "memory.json"
    options = ["--memory", "--tiny", "--pairs", "moeut", "moduleformer", "--threads", "1", "--json", str(out)]
    monkeypatch.setattr("sys.argv", ["bench_models", *options])
    bench_models_main()
    results = json.loads(out.read_text())["results"]
    assert [(r["pair"], r["model"]) for r in results] == [
        ("moeut", "baseline"), ("moeut", "moeut-44m"), ("moduleformer", "baseline"), ("moduleformer", "moduleformer")
    ]  # fmt: skip
    assert all(r["activation_bytes"] > 0 and r["parameters"] > 0 for r in results)
