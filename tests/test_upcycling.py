"""`benchmarks/upcycling.py` at tiny sizes: the report has finite losses, and the function-preserving ("exact")
conversions start at GPT-2's held-out loss.

Tolerance: the exact forms compute GPT-2's function in fp32 with other op orders (logits agree to ~1e-5), so their
mean held-out losses agree to 1e-4 nats; the upcycled forms (shared layers, stick-breaking) are not held to any value.
"""

import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks import upcycling
from modeling_mom.workflows import embedded_data


def test_upcycling_report_has_finite_losses_and_exact_forms_start_at_gpt2(tmp_path):
    tokenizer = embedded_data.build_tokenizer()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_layer=4, n_embd=32, n_head=4, n_positions=64,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    with torch.no_grad():  # nonzero biases and LayerNorm shifts, so the exact forms must copy them to match
        for parameter in gpt2.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    variants = ["moeut-exact", "moeut-G2", "moduleformer-exact", "moduleformer-stickbreaking"]
    results = upcycling.main([
        "--gpt2", str(tmp_path / "gpt2"), "--out", str(tmp_path / "runs"), "--variants", *variants, "--steps", "2",
        "--batch-size", "4", "--block-size", "32", "--threads", "1", "--json", str(tmp_path / "report.json"),
    ])  # fmt: skip
    assert set(results) == {"gpt2", *variants}
    for name, result in results.items():
        assert math.isfinite(result["eval_loss_before"]) and math.isfinite(result["eval_loss"]), name
    for name in ("moeut-exact", "moduleformer-exact"):
        assert abs(results[name]["eval_loss_before"] - results["gpt2"]["eval_loss_before"]) < 1e-4, name
    assert (tmp_path / "report.json").exists()
