"""Conversion of the MoEUT training code's checkpoints (`conversion/official_moeut_to_moeut.py`).

The training code is not a dependency: each checkpoint here is written in its format by the test, from one of our
own tiny models with its weights renamed back (the layout of the training code's `torch.save` file: "model" is the
LM's state dict, "run_invariants"["args"] the run's arguments as its ArgumentParser stores them, "state" a pickled
`framework.data_structures.dotdict.DotDict`). Converting must give back the same weights and so the same logits,
exactly. Parity with the training code's own forward was checked outside this repository (on CPU, fp32, with its
Triton CVMM restated in PyTorch): max logit difference ~1e-6 at logits of ~3, and the entropy regulariser equal.
"""

import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conversion.official_moeut_to_moeut import (
    config_from_arguments,
    convert,
    convert_tokenizer,
    main,
    read_arguments,
)
from modeling_mom import MoEUTConfig, MoEUTForCausalLM

# The 44M run's arguments (sweeps/c4_moeut_small_matched_rope_noln_long.yaml) as the training code's ArgumentParser
# stores them in run_invariants["args"]: bools as 0/1, int-or-none and float-or-none arguments as strings. A real file
# holds ~140 arguments; the others (optimiser, logging, data) are not read.
ARGS_44M = {
    "task": "c4_transformer", "lr": 0.00025, "batch_size": 64, "state_size": 412, "embedding_size": "none",
    "dropout": 0.0, "transformer.n_heads": 4, "transformer.variant": "preln_moe_universal",
    "transformer.encoder_n_layers": 16, "transformer.head_projection_size": "82", "transformer.universal.group_size": 2,
    "transformer.universal.group_type": "abab", "transformer.activation": "relu", "transformer.embedding_scale": "none",
    "transformer.p_drop_layer": 0.0, "lm.unroll": 1024, "lm.trafo.context_blocks": 0, "lm.trafo.norm_input": 0,
    "rope.rotate_fraction": 0.5, "rope.base": 10000.0, "pkm.n_heads": 12, "moe.n_experts": 155, "moe.expert_size": 128,
    "moe.selection_mode": "sigmoid", "moe.perplexity_reg": 0.01, "moe.perplexity_reg_mode": "layers_time",
    "moe.activation_after_topk": 0, "moe.bias": 0, "moe.sel_bias": 0, "moe.drop_expert": 0.0,
    "moe.selection_dropout": 0.0, "moe.nonorm": 1, "moe.att.enable": 1, "moe.att.n_experts": 8, "moe.att.k": 2,
    "moe.att.q_expert": 0, "moe.att.k_expert": 0, "moe.att.v_expert": 1, "moe.att.o_expert": 1,
    "moe.att.v_size": "none", "moe.att.same_sel": 0, "moe.att.selection_mode": "sigmoid",
    "moe.att.perplexity_reg": "0.001", "moe.att.perplexity_reg_mode": "none", "moe.att.drop_expert": "none",
    "moe.att.dropout": 0.0, "moe.att.selection_dropout": 0.0,
}  # fmt: skip
TINY = {"state_size": 32, "transformer.n_heads": 2, "transformer.head_projection_size": "12",
        "transformer.encoder_n_layers": 4, "moe.n_experts": 6, "moe.expert_size": 8, "pkm.n_heads": 2,
        "moe.att.n_experts": 3, "lm.unroll": 64}  # fmt: skip
VOCAB = 53


def our_model(args: dict, vocab: int = VOCAB, seed: int = 0) -> MoEUTForCausalLM:
    """Our tiny model with the architecture `args` describe, random weights, LayerNorms off their (1, 0) init."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training-only dropout warning; tested below
        config, _ = config_from_arguments(read_arguments(args), vocab)
    torch.manual_seed(seed)
    model = MoEUTForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name == "lm_head.bias":
                p.add_(0.3 * torch.randn_like(p))
    return model


def training_state(model: MoEUTForCausalLM, norm_scheme: str, embedding_scale: float = 1.0) -> dict:
    """`model`'s weights under the training code's names (models/transformer_language_model.py,
    layers/transformer/relative_moe_transformer.py, full_moe_relative_attention.py, layers/moe_layer.py), with the
    two MoE statistics buffers it also saves."""
    ours = model.state_dict()
    state = {
        "embedding.weight": ours["model.embed_tokens.weight"] / embedding_scale,
        "output.weight": ours["lm_head.weight"],
        "output.bias": ours["lm_head.bias"],
        "out_norm.weight": ours["model.norm.weight"],
        "out_norm.bias": ours["model.norm.bias"],
    }
    ln1, ln2 = ("self_attn.norm", "pkm.norm") if norm_scheme == "peri" else ("norm1", "norm2")
    for g in range(model.config.num_unique_layers):
        p, t = f"model.layers.{g}.", f"unique_layers.{g}."
        state.update({
            t + "self_attn.selections.o": ours[p + "attention.o_router.weight"],
            t + "self_attn.selections.v": ours[p + "attention.v_router.weight"],
            t + "self_attn.projections.k": ours[p + "attention.k_proj.weight"],
            t + "self_attn.projections.o": ours[p + "attention.o_experts"],
            t + "self_attn.projections.q": ours[p + "attention.q_proj.weight"],
            t + "self_attn.projections.v": ours[p + "attention.v_experts"],
            t + "pkm.keys": ours[p + "mlp.experts.up_proj"],
            t + "pkm.values": ours[p + "mlp.experts.down_proj"],
            t + "pkm.expert_sel": ours[p + "mlp.router.weight"],
            t + "pkm.iter": torch.tensor(100000),
            t + "pkm.kv_sel_counts_100": torch.zeros(model.config.num_experts, model.config.moe_intermediate_size),
        })  # fmt: skip
        for name, theirs in (("input_layernorm", ln1), ("post_attention_layernorm", ln2)):
            state[t + theirs + ".weight"] = ours[p + name + ".weight"]
            state[t + theirs + ".bias"] = ours[p + name + ".bias"]
    return {k: v.clone() for k, v in state.items()}


@pytest.fixture
def dotdict(monkeypatch):
    """The training code's DotDict, importable (for pickling) only while the test writes checkpoints."""
    modules = {name: types.ModuleType(name) for name in ("framework", "framework.data_structures",
                                                         "framework.data_structures.dotdict")}  # fmt: skip

    class DotDict(dict):
        pass

    DotDict.__module__, DotDict.__qualname__ = "framework.data_structures.dotdict", "DotDict"
    modules["framework.data_structures.dotdict"].DotDict = DotDict
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return DotDict


def write_checkpoint(path: Path, state: dict, args: dict, dotdict) -> Path:
    """A file laid out as framework/helpers/saver.py writes it (the released files have no "optimizer")."""
    data = {
        "state": dotdict(iter=100000, epoch=0),
        "run_invariants": {"args": dict(args), "wandb_id": None},
        "sampler": {"pos": None},
        "scaler": {},
        "model": state,
        "interface": {},
    }
    torch.save(data, path)
    return path


CASES = {
    "peri-G2": {},
    "pre-LN": {"moe.nonorm": 0},
    "unshared": {"transformer.variant": "preln_moe", "transformer.encoder_n_layers": 3},
    "G1-gelu-rot0.3": {
        "transformer.universal.group_size": 1,
        "transformer.activation": "gelu",
        "rope.rotate_fraction": 0.3,
        "moe.att.k": 1,
    },  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_back_the_same_model(case, tmp_path, dotdict):
    args = {**ARGS_44M, **TINY, **CASES[case]}
    model = our_model(args)
    scheme = "pre" if case == "pre-LN" else "peri"
    src = write_checkpoint(tmp_path / "run.ckpt", training_state(model, scheme), args, dotdict)
    converted = convert(src)
    assert converted.config.norm_scheme == scheme
    ours, theirs = model.state_dict(), converted.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(converted(ids).logits, model(ids).logits)


def test_the_44m_runs_arguments_give_the_44m_preset():
    """The 44M run's arguments give the 44M preset's architecture, and the two fields the arguments do not name but
    the training code fixes: LayerNorm eps 1e-5 (every LayerNorm there is `torch.nn.LayerNorm(d_model)`, torch's
    default eps; relative_moe_transformer.py) and the context length, the run's `lm.unroll` (1024; the preset's
    own value says nothing about the converter, so it is compared with the argument)."""
    config, how = config_from_arguments(read_arguments(ARGS_44M), vocab_size=8000)
    preset = MoEUTConfig.from_preset("moeut-44m")
    for field in ("hidden_size", "num_hidden_layers", "num_unique_layers", "num_attention_heads", "head_dim",
                  "num_attention_experts", "num_attention_experts_per_tok", "num_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "hidden_act", "norm_scheme", "rope_theta", "num_rotary_dims",
                  "router_aux_loss_coef", "attention_router_aux_loss_coef", "lm_head_bias", "tie_word_embeddings",
                  "vocab_size"):  # fmt: skip
        assert getattr(config, field) == getattr(preset, field), field
    assert config.num_rotary_dims == 40 and how == {"norm_scheme": "peri", "embedding_scale": 1.0}
    assert config.layer_norm_eps == 1e-5 and config.max_position_embeddings == ARGS_44M["lm.unroll"] == 1024
    tiny, _ = config_from_arguments(read_arguments({**ARGS_44M, **TINY}), vocab_size=VOCAB)
    assert tiny.max_position_embeddings == TINY["lm.unroll"] == 64 and tiny.layer_norm_eps == 1e-5


def test_dtype_option_casts_every_weight(tmp_path, dotdict):
    """`dtype` casts every floating weight of the (float32) checkpoint, and `--dtype bfloat16`'s saved weights
    reload as bf16 with dtype="auto"; without it the checkpoint's float32 is kept."""
    args = {**ARGS_44M, **TINY}
    src = write_checkpoint(tmp_path / "run.ckpt", training_state(our_model(args), "peri"), args, dotdict)
    model = convert(src, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert {p.dtype for p in convert(src).parameters() if p.is_floating_point()} == {torch.float32}
    main(["--src", str(src), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert {p.dtype for p in reloaded.parameters() if p.is_floating_point()} == {torch.bfloat16}


def test_embedding_scale_is_folded_into_the_embedding(tmp_path, dotdict):
    args = {**ARGS_44M, **TINY, "transformer.embedding_scale": "2.5"}
    model = our_model(args)
    src = write_checkpoint(tmp_path / "run.ckpt", training_state(model, "peri", embedding_scale=2.5), args, dotdict)
    converted = convert(src)
    torch.testing.assert_close(converted.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_command_line_writes_a_loadable_checkpoint(tmp_path, dotdict, capsys):
    args = {**ARGS_44M, **TINY}
    model = our_model(args)
    src = write_checkpoint(tmp_path / "C4_44M.ckpt", training_state(model, "peri"), args, dotdict)
    main(["--src", str(src), "--out", str(tmp_path / "hf")])
    assert "saved" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(reloaded, MoEUTForCausalLM) and reloaded.config.num_unique_layers == 2
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    main(["--src", str(src), "--out", str(tmp_path / "hf"), "--overwrite", "--dtype", "bfloat16"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


UNSUPPORTED = {
    "transformer.variant": ("moe_universal", "unsupported training argument transformer.variant='moe_universal'"),
    "moe.att.selection_mode": ("softmax", "moe.att.selection_mode='softmax'; allowed: 'sigmoid'"),
    "transformer.universal.group_type": ("aabb", "group_type='aabb'; allowed: 'abab'"),
    "lm.trafo.context_blocks": (1, "lm.trafo.context_blocks=1; allowed: 0. It needs Transformer-XL memory"),
    "moe.att.q_expert": (1, "moe.att.q_expert=1; allowed: 0"),
    "moe.bias": (1, "moe.bias=1; allowed: 0"),
    "transformer.activation": ("topk", "transformer.activation='topk'; allowed: ('relu', 'gelu')"),
    "moe.perplexity_reg_mode": ("step", "moe.perplexity_reg_mode='step'; allowed: 'layers_time'"),
    "transformer.universal.group_size": (3, "group_size=3; allowed: a divisor of encoder_n_layers=4"),
    "transformer.n_heads": (0, "transformer.n_heads=0; allowed: a positive integer"),  # was a ZeroDivisionError
    "state_size": (0, "state_size=0; allowed: a positive integer"),  # was refused as our hidden_size
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_arguments_are_refused_by_name(name, tmp_path, dotdict, capsys):
    args = {**ARGS_44M, **TINY}
    state = training_state(our_model(args), "peri")
    value, message = UNSUPPORTED[name]
    src = write_checkpoint(tmp_path / "run.ckpt", state, {**args, name: value}, dotdict)
    with pytest.raises(ValueError, match="unsupported training argument"):
        convert(src)
    with pytest.raises(SystemExit):
        main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_are_usage_errors_and_write_nothing(tmp_path, dotdict, capsys):
    args = {**ARGS_44M, **TINY}
    state = training_state(our_model(args), "peri")
    other = {**state, "unique_layers.0.pkm.values": state["unique_layers.0.pkm.values"][:, :-1]}
    sources = {
        "missing": ({k: v for k, v in state.items() if k != "unique_layers.1.self_attn.selections.v"}, args),
        "unexpected": ({**state, "unique_layers.0.norm1.weight": torch.ones(32)}, args),
        "misshapen": (other, args),
        "no state_size": (state, {k: v for k, v in args.items() if k != "state_size"}),
        "bad value": (state, {**args, "moe.n_experts": "many"}),
    }
    messages = {
        "missing": "missing [unique_layers.1.self_attn.selections.v], unexpected []",
        "unexpected": "missing [], unexpected [unique_layers.0.norm1.weight]",
        "misshapen": "unique_layers.0.pkm.values (6, 7, 32) (arguments: (6, 8, 32))",
        "no state_size": "the checkpoint's arguments lack ['state_size']",
        "bad value": "training argument moe.n_experts='many' is not a valid int",
    }
    torch.save(state, tmp_path / "bare.pt")  # a bare state dict: no arguments to build the config from
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    paths = {name: write_checkpoint(tmp_path / f"{i}.ckpt", *sources[name], dotdict) for i, name in enumerate(sources)}
    paths.update({"bare": tmp_path / "bare.pt", "text": tmp_path / "text.ckpt", "absent": tmp_path / "absent.ckpt"})
    messages.update({"bare": "expected a dict with 'model' and 'run_invariants'",
                     "text": "could not be read as a training-code checkpoint", "absent": "is not a file"})  # fmt: skip
    for name, src in paths.items():
        with pytest.raises(SystemExit):
            main(["--src", str(src), "--out", str(tmp_path / "out")])
        assert messages[name] in capsys.readouterr().err, name
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # replacing --out would delete the source
        main(["--src", str(paths["missing"]), "--out", str(tmp_path), "--overwrite"])
    assert "contains --src" in capsys.readouterr().err


def test_training_only_dropouts_are_dropped_with_a_warning(tmp_path, dotdict):
    args = {**ARGS_44M, **TINY, "dropout": 0.1, "moe.att.drop_expert": "0.05"}
    src = write_checkpoint(tmp_path / "run.ckpt", training_state(our_model(args), "peri"), args, dotdict)
    with pytest.warns(UserWarning, match=r"not carried over.*dropout=0.1"):
        model = convert(src)
    assert model.config.attention_output_dropout == 0 and model.config.attention_expert_dropout == 0.05


def test_tokenizer_without_sentencepiece_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ValueError, match="needs the sentencepiece and protobuf packages"):
        convert_tokenizer(tmp_path / "tokenizer.model")


def test_sentencepiece_tokenizer_is_converted_and_saved(tmp_path, dotdict, capsys):
    """A SentencePiece model trained as the training code trains its own (tokenizers/sentencepiece.py: BPE,
    split_digits); only where sentencepiece and protobuf are installed."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    import random

    from transformers import AutoTokenizer

    rng = random.Random(0)
    words = "the of and model expert layer shared token 2024 attention universal transformer, mixture. 42".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "tokenizer.model"),
        vocab_size=VOCAB + 27,
        split_digits=True,
        model_type="bpe",
        minloglevel=2,
    )
    spm_file = tmp_path / "tokenizer.model.model"  # the training code's own naming
    reference = spm.SentencePieceProcessor(model_file=str(spm_file))
    texts = lines[:200] + ["  spaced   out  ", "digits 1234567", "<s> text </s>", "unknown ünï 中文", ""]
    tokenizer = convert_tokenizer(spm_file)
    assert [tokenizer.encode(t) for t in texts] == [reference.encode(t) for t in texts]
    args = {**ARGS_44M, **TINY}
    model = our_model(args, vocab=VOCAB + 27)
    src = write_checkpoint(tmp_path / "run.ckpt", training_state(model, "peri"), args, dotdict)
    main(["--src", str(src), "--out", str(tmp_path / "hf"), "--tokenizer", str(spm_file)])
    assert "with tokenizer" in capsys.readouterr().out
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [reloaded.encode(t) for t in texts] == [reference.encode(t) for t in texts]
    assert reloaded.decode(reference.encode(lines[0])) == lines[0]
    with pytest.raises(ValueError, match="not this run's tokenizer"):
        convert_tokenizer(spm_file, vocab_size=VOCAB)
