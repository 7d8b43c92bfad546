"""GPT-2 -> MoM conversion (`conversion/gpt2_to_mom.py`): faithfulness to GPT-2, mom.md section 7's special cases,
the CLI, and the saved checkpoint.

Tolerance: fp32 on CPU, eval mode. Sequential routing runs GPT-2's own operations (Conv1D-layout `addmm`, the same
LayerNorm and attention kernels), so the logits come out bitwise equal in practice; the routed path of the section 7
cases gathers rows, multiplies them per module and scatters them back with `index_add`, which may round differently
(measured: up to ~3e-6 on logits of magnitude ~7). We allow an absolute 1e-5, and check that each comparison is not
vacuous: changing the computation (deleting or repeating a layer) moves the logits by far more than that.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from conversion.gpt2_to_mom import convert, gpt2_layer_map, main, mom_config
from modeling_mom import MoMConfig, MoMForCausalLM
from modeling_mom.workflows.hub import render_card

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97
ATOL = 1e-5
SEQUENTIAL = dict(routing_mode="sequential")
STRUCTURES = {  # both use all 6 layers of the tiny GPT-2
    "bottom-chunk-anchor-top": dict(num_bottom_layers=1, num_top_layers=1, num_chunks=1, num_attention_modules=3,
                                    num_ffn_modules=3, use_anchor_layers=True),
    "chunks-only": dict(num_bottom_layers=0, num_top_layers=0, num_chunks=3, num_attention_modules=2,
                        num_ffn_modules=2, use_anchor_layers=False),
}  # fmt: skip


def tiny_gpt2(n_layer=6, seed=0, **overrides) -> GPT2LMHeadModel:
    """A random GPT-2 whose every parameter (LayerNorms and biases included) is distinct, so a swapped or missing
    tensor changes the logits; a large init makes each layer matter and greedy decoding non-trivial."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0, **overrides,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def gpt2_with_layers(gpt2: GPT2LMHeadModel, layers: list[int]) -> GPT2LMHeadModel:
    """A GPT-2 whose block i is a copy of `gpt2`'s block `layers[i]` (deleting or repeating layers)."""
    config = copy.deepcopy(gpt2.config)
    config.n_layer = len(layers)
    model = GPT2LMHeadModel(config).eval()
    state = {k: v for k, v in gpt2.state_dict().items() if not k.startswith("transformer.h.")}
    for new, old in enumerate(layers):
        prefix = f"transformer.h.{old}."
        state.update(
            {f"transformer.h.{new}.{k[len(prefix) :]}": v for k, v in gpt2.state_dict().items() if k.startswith(prefix)}
        )
    model.load_state_dict(state)
    return model


def padded_batch():
    """Row 0 full, row 1 left-padded, row 2 right-padded (pad id 0)."""
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    return ids, mask


def gpt2_logits(gpt2, ids, mask):
    # positions count real tokens, as `generate` and MoM compute them, so left padding does not shift them
    return gpt2(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def max_diff_on_real_tokens(a, b, mask):
    """Padded positions' logits are meaningless and are not compared."""
    return (a - b)[mask.bool()].abs().max().item()


# ------------------------------------------------------------------------------------ mapping and validation


def test_layer_map_follows_the_authors_get_layer_map():
    # mom.md section 3.1's worked example: GPT-2 small, 1 bottom, 2 chunks of 4 modules with anchors, 1 top
    config = mom_config(GPT2Config(n_layer=12), num_bottom_layers=1, num_top_layers=1, num_chunks=2,
                        num_attention_modules=4, num_ffn_modules=4)  # fmt: skip
    assert gpt2_layer_map(config) == [[0], [1, 2, 3, 4], [5], [6, 7, 8, 9], [10], [11]]
    assert config.num_rounds == 4  # default: one round per seeded layer


def test_smaller_attention_pool_takes_the_first_layers_of_the_chunk():
    gpt2 = tiny_gpt2(n_layer=5)
    model = convert(gpt2, num_bottom_layers=1, num_top_layers=0, num_chunks=1, num_attention_modules=2,
                    num_ffn_modules=3, use_anchor_layers=True)  # fmt: skip
    chunk, blocks = model.model.layers[1], gpt2.transformer.h
    assert chunk.attention.num_modules == 2 and chunk.mlp.num_modules == 3
    assert torch.equal(
        chunk.attention.qkv_proj, torch.stack([blocks[1].attn.c_attn.weight, blocks[2].attn.c_attn.weight])
    )
    assert torch.equal(chunk.mlp.down_proj, torch.stack([b.mlp.c_proj.weight for b in blocks[1:4]]))
    assert torch.equal(model.model.layers[2].mlp.norm.weight[0], blocks[4].ln_2.weight)  # the anchor


def test_structure_that_does_not_fit_names_the_sum_and_suggests_fits():
    structure = dict(num_bottom_layers=1, num_top_layers=1, num_chunks=2, num_attention_modules=4, num_ffn_modules=4)
    with pytest.raises(ValueError) as error:
        convert(tiny_gpt2(), **structure)
    message = str(error.value)
    assert "1 + 1 + 2 * (4 + 1) = 12" in message and "n_layer=6" in message
    assert "num_chunks=1 with num_bottom_layers + num_top_layers = 1" in message
    assert "num_attention_modules=num_ffn_modules=1" in message
    for suggestion in (dict(num_chunks=1, num_top_layers=0), dict(num_attention_modules=1, num_ffn_modules=1)):
        convert(tiny_gpt2(), **{**structure, **suggestion})  # the suggestions fit


@pytest.mark.parametrize(
    "gpt2_overrides, structure, match",
    [
        ({}, dict(num_chunk=1), "num_chunk"),
        ({}, dict(hidden_size=64), "hidden_size"),
        ({"scale_attn_by_inverse_layer_idx": True}, {}, "scale_attn_by_inverse_layer_idx"),
        ({}, dict(routing_mode="sequential", num_attention_modules=2, num_ffn_modules=3, num_chunks=1,
                  num_bottom_layers=1, num_top_layers=1), "num_rounds"),
    ],
)  # fmt: skip
def test_invalid_requests_raise_value_error(gpt2_overrides, structure, match):
    config = GPT2Config(n_layer=6, **gpt2_overrides)
    with pytest.raises(ValueError, match=match):
        mom_config(config, **structure)


# ------------------------------------------------------------------------------ sequential routing == GPT-2


@pytest.mark.parametrize("structure", STRUCTURES.values(), ids=STRUCTURES.keys())
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_sequential_logits_equal_gpt2(structure, attn_implementation):
    gpt2 = tiny_gpt2()
    model = convert(gpt2, **structure, **SEQUENTIAL)
    assert not model.config.output_router_logits
    gpt2.set_attn_implementation(attn_implementation)
    model.set_attn_implementation(attn_implementation)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected, logits = gpt2_logits(gpt2, ids, mask), model(ids, attention_mask=mask).logits
    assert max_diff_on_real_tokens(logits, expected, mask) <= ATOL
    assert expected.abs().max() > 1  # logits of a realistic size, so the tolerance is meaningful


@pytest.mark.parametrize("structure", [{}, STRUCTURES["chunks-only"]], ids=["default-one-chunk", "chunks-only"])
def test_exact_form_equals_gpt2(structure):
    gpt2 = tiny_gpt2()
    model = convert(gpt2, exact=True, **structure)
    assert model.config.routing_mode == "sequential"
    ids, mask = padded_batch()
    with torch.no_grad():
        expected, logits = gpt2_logits(gpt2, ids, mask), model(ids, attention_mask=mask).logits
    assert max_diff_on_real_tokens(logits, expected, mask) <= ATOL


@pytest.mark.parametrize(
    "structure, match",
    [(dict(routing_mode="learned"), "routing_mode"), (dict(num_rounds=2), "num_rounds")],
)
def test_exact_form_rejects_contradicting_fields(structure, match):
    with pytest.raises(ValueError, match=match):
        convert(tiny_gpt2(), exact=True, **structure)


def test_untied_gpt2_keeps_its_lm_head():
    gpt2 = tiny_gpt2(tie_word_embeddings=False)
    model = convert(gpt2, **STRUCTURES["chunks-only"], **SEQUENTIAL)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids, mask = padded_batch()
    with torch.no_grad():
        expected, logits = gpt2_logits(gpt2, ids, mask), model(ids, attention_mask=mask).logits
    assert max_diff_on_real_tokens(logits, expected, mask) <= ATOL


@pytest.mark.parametrize("structure", STRUCTURES.values(), ids=STRUCTURES.keys())
def test_sequential_greedy_generation_equals_gpt2(structure):
    gpt2 = tiny_gpt2()
    model = convert(gpt2, **structure, **SEQUENTIAL)
    ids, mask = padded_batch()
    ids, mask = ids[:2, :8], mask[:2, :8]  # one full and one left-padded prompt
    kwargs = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True,
                  pad_token_id=0)  # fmt: skip
    expected = gpt2.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert all(len(set(row[-20:].tolist())) > 3 for row in expected)  # not a degenerate repetition


# ------------------------------------------------------------------------- mom.md section 7: special cases

ONE_MODULE_CHUNK = dict(num_bottom_layers=1, num_top_layers=1, num_chunks=1, num_attention_modules=1,
                        num_ffn_modules=1, use_anchor_layers=False, routing_mode="learned")  # fmt: skip


def force_routers(model, choice: int):
    """Make every router of every chunk pick `choice` (0 = the module, 1 = SKIP) for every token."""
    with torch.no_grad():
        for layer in model.model.layers:
            for router in (getattr(layer, "attention_router", None), getattr(layer, "mlp_router", None)):
                if router is not None:
                    router.out.weight.zero_()
                    router.out.bias.fill_(-30.0)
                    router.out.bias[choice] = 30.0


@pytest.mark.parametrize("router_type", ["mlp", "gru"])
def test_layer_skipping(router_type):
    """A chunk holding GPT-2 layer 1 alone, with SKIP: all tokens SKIP = GPT-2 without layer 1; all tokens pick the
    module = full GPT-2."""
    gpt2 = tiny_gpt2(n_layer=3)
    model = convert(gpt2, **ONE_MODULE_CHUNK, num_rounds=1, enable_skip=True, router_type=router_type)
    ids, mask = padded_batch()
    with torch.no_grad():
        full = gpt2_logits(gpt2, ids, mask)
        without_layer_1 = gpt2_logits(gpt2_with_layers(gpt2, [0, 2]), ids, mask)
        force_routers(model, choice=1)
        skipping = model(ids, attention_mask=mask).logits
        force_routers(model, choice=0)
        using = model(ids, attention_mask=mask).logits
    assert max_diff_on_real_tokens(skipping, without_layer_1, mask) <= ATOL
    assert max_diff_on_real_tokens(using, full, mask) <= ATOL
    assert max_diff_on_real_tokens(full, without_layer_1, mask) > 1000 * ATOL  # layer 1 matters


@pytest.mark.parametrize("num_rounds", [2, 4])
def test_one_module_repeated_for_h_rounds(num_rounds):
    """A chunk holding GPT-2 layer 1 alone, without SKIP, run for H rounds = GPT-2 with layer 1 repeated H times.
    Its pools have a single choice, so (as in the authors' code) they have no router and nothing to balance."""
    gpt2 = tiny_gpt2(n_layer=3)
    model = convert(gpt2, **ONE_MODULE_CHUNK, num_rounds=num_rounds, enable_skip=False)
    chunk = model.model.layers[1]
    assert chunk.attention_router is None and chunk.mlp_router is None
    ids, mask = padded_batch()
    with torch.no_grad():
        repeated = gpt2_logits(gpt2_with_layers(gpt2, [0] + [1] * num_rounds + [2]), ids, mask)
        logits = model(ids, attention_mask=mask).logits
        once = gpt2_logits(gpt2, ids, mask)
    assert max_diff_on_real_tokens(logits, repeated, mask) <= ATOL
    assert max_diff_on_real_tokens(once, repeated, mask) > 1000 * ATOL  # the repetition matters


# ------------------------------------------------------------------------------------- CLI and checkpoints


@pytest.fixture
def gpt2_dir(tmp_path):
    """A saved tiny GPT-2 with a (toy) GPT-2 tokenizer, as a user's local checkpoint directory."""
    path = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(path)
    GPT2Tokenizer(vocab={"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, merges=[("a", "b")]).save_pretrained(path)
    return path


CLI_STRUCTURE = ["--num-bottom-layers", "1", "--num-top-layers", "1", "--num-chunks", "1",
                 "--num-attention-modules", "3", "--num-ffn-modules", "3"]  # fmt: skip

REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mom"] = None  # the package must not be importable: only the saved code may run
    import torch
    from transformers import AutoModelForCausalLM
    path, inputs = sys.argv[1], torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__name__ == "MoMForCausalLM" and not type(model).__module__.startswith("modeling_mom")
    with torch.no_grad():
        torch.save(model(**inputs).logits, sys.argv[3])
    """
)


def test_cli_end_to_end_and_remote_code_load(gpt2_dir, tmp_path):
    out = tmp_path / "mom"
    command = [sys.executable, "-m", "conversion.gpt2_to_mom", "--gpt2", str(gpt2_dir), "--out", str(out),
               *CLI_STRUCTURE, "--routing-mode", "sequential"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert "computes GPT-2's function" in result.stdout and "unrolled depth: 6" in result.stdout

    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (gpt2_dir / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out)("abab").input_ids == [2, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left

    ids, mask = padded_batch()
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # in-process: the package is imported
    assert isinstance(model, MoMForCausalLM)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        expected = gpt2_logits(GPT2LMHeadModel.from_pretrained(gpt2_dir).eval(), ids, mask)
    assert max_diff_on_real_tokens(logits, expected, mask) <= ATOL

    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "inputs.pt")
    remote_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    remote_env.pop("PYTHONPATH", None)
    args = [str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "remote.pt")]
    subprocess.run([sys.executable, "-c", REMOTE_LOAD, *args], cwd="/", env=remote_env, check=True)
    remote = torch.load(tmp_path / "remote.pt")
    assert (remote - logits).abs().max().item() <= 1e-6  # the same code and weights: equal up to kernel rounding

    with pytest.raises(ValueError, match="'mom'"):  # a MoM checkpoint is not a GPT-2
        convert(out)


def test_cli_learned_routing_saves_the_routing_options(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "learned"
    main(["--gpt2", str(gpt2_dir), "--out", str(out), *CLI_STRUCTURE, "--router-type", "gru", "--no-skip"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["routing_mode"] == "learned"
    assert saved["router_type"] == "gru" and saved["enable_skip"] is False and saved["num_rounds"] == 3
    assert "learned (gru routers" in capsys.readouterr().out
    config = MoMConfig.from_pretrained(out)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_mom.MoMForCausalLM"


def test_cli_saves_the_authors_ablation_switches(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "ablation"
    switches = ["--routing-mode", "all_modules", "--router-weighting", "probability", "--sign-router-weights",
                "--weighted-qkv", "--router-aux-loss-per-round"]  # fmt: skip
    main(["--gpt2", str(gpt2_dir), "--out", str(out), *CLI_STRUCTURE, *switches])
    saved = json.loads((out / "config.json").read_text())
    assert saved["routing_mode"] == "all_modules" and saved["router_weighting"] == "probability"
    assert saved["sign_router_weights"] and saved["weighted_qkv"] and saved["router_aux_loss_per_round"]
    assert "all_modules (mlp routers, probability weights, sign_router_weights, weighted_qkv" in capsys.readouterr().out
    card = str(render_card(str(out), "me/ablation"))
    assert "weights every module of the pool" in card and "by the weights' signs" in card and "Q, K and V" in card


def test_cli_structure_that_does_not_fit_writes_nothing(gpt2_dir, tmp_path, capsys):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["--gpt2", str(gpt2_dir), "--out", str(tmp_path / "mom"), "--num-chunks", "2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "= 12 GPT-2 layers" in error and "n_layer=6" in error and "Structures that fit" in error
    assert sorted(os.listdir(tmp_path)) == before
