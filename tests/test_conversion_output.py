"""Every converter's command line writes its checkpoint all or nothing (`conversion/checkpoint_writer.py`): a
non-empty `--out` is replaced only with `--overwrite`, and a failure while writing leaves neither a partial checkpoint
nor a damaged earlier one, nor the staging directory."""

import importlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from conversion import checkpoint_writer

CONVERTERS = {  # converter module -> options for a tiny GPT-2 (n_embd 32, 4 heads, 2 layers)
    "gpt2_to_mom": ["--exact"],
    "gpt2_to_moeut": ["--exact", "--expert-size", "64"],
    "gpt2_to_moduleformer": ["--exact", "--num-experts", "4"],
}


@pytest.fixture
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=16, n_embd=32, n_layer=2, n_head=4)).save_pretrained(path)
    GPT2Tokenizer(vocab={"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, merges=[("a", "b")]).save_pretrained(path)
    return path


def run(name, gpt2_dir, out, *extra):
    converter = importlib.import_module(f"conversion.{name}")
    converter.main(["--gpt2", str(gpt2_dir), "--out", str(out), *CONVERTERS[name], *extra])


@pytest.mark.parametrize("name", CONVERTERS)
def test_non_empty_output_is_replaced_only_with_overwrite(name, gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit):
        run(name, gpt2_dir, out)
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    run(name, gpt2_dir, out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "tokenizer_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type in name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the replaced directory is deleted


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("name", CONVERTERS)
def test_error_while_writing_leaves_no_partial_directory(name, existing, gpt2_dir, tmp_path, monkeypatch):
    def failing_copy(source, target):
        assert (target / "config.json").exists()  # the weights were written to the staging directory
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_writer, "copy_tokenizer", failing_copy)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        run(name, gpt2_dir, out, "--overwrite")
    assert sorted(os.listdir(tmp_path)) == before  # no staging directory, no new output
    assert os.listdir(out) == ["keep.txt"] if existing else not out.exists()


@pytest.mark.parametrize("name", CONVERTERS)
def test_a_source_that_is_not_a_gpt2_is_refused_before_converting(name, tmp_path, capsys):
    """Another architecture's weights would load as a randomly initialised GPT-2, with only a load report."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source = tmp_path / "llama"
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(source)
    with pytest.raises(SystemExit):
        run(name, source, tmp_path / "out")
    assert "'llama' checkpoint; a GPT-2 ('gpt2') is required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", CONVERTERS)
def test_the_working_directory_is_refused_as_output(name, gpt2_dir, tmp_path, monkeypatch, capsys):
    """`--out .` (or a directory containing the working directory) cannot be renamed into place: refused before
    converting, and nothing is left beside it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        with pytest.raises(SystemExit):
            run(name, gpt2_dir, out, "--overwrite")
        assert "is the working directory or contains it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "work"] and not list(work.iterdir())


def test_a_failed_move_aside_leaves_no_directory_behind(tmp_path, monkeypatch):
    """Replacing an existing output moves it aside first; if that fails, the aside directory is removed too."""
    from modeling_mom.workflows import common

    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    replace = os.replace

    def failing_replace(source, target):
        if Path(source) == out:
            raise OSError("busy")
        replace(source, target)

    monkeypatch.setattr(common.os, "replace", failing_replace)
    with pytest.raises(OSError, match="busy"):
        common.move_into_place(staging, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "staging"]


@pytest.mark.parametrize("name", CONVERTERS)
def test_a_source_without_usable_weights_is_refused(name, gpt2_dir, tmp_path, capsys):
    """A missing directory, a directory without weights and weights lacking layers (which would load randomly
    initialised) are usage errors naming the problem; a GPT-2 saved without its head (`GPT2Model`) converts."""
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((gpt2_dir / "config.json").read_text())
    fewer_layers = tmp_path / "fewer_layers"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=16, n_embd=32, n_layer=1, n_head=4)).save_pretrained(
        fewer_layers
    )
    (fewer_layers / "config.json").write_text((gpt2_dir / "config.json").read_text())  # says n_layer=2
    cases = {
        tmp_path / "missing": "is not a GPT-2 checkpoint directory or a reachable hub id",
        no_weights: "cannot load GPT-2 weights from",
        fewer_layers: "weights lack 12 tensor(s) its config needs: transformer.h.1.attn.c_attn.bias, ",
    }
    for source, message in cases.items():
        with pytest.raises(SystemExit):
            run(name, source, tmp_path / "out")
        assert message in capsys.readouterr().err, source
        assert not (tmp_path / "out").exists()
    from transformers import GPT2Model

    GPT2LMHeadModel.from_pretrained(gpt2_dir).transformer.save_pretrained(tmp_path / "base")
    run(name, tmp_path / "base", tmp_path / "out")
    ids = torch.tensor([[0, 1, 2, 3]])
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()(ids).logits
    assert isinstance(GPT2Model.from_pretrained(tmp_path / "base"), GPT2Model)
    torch.testing.assert_close(converted(ids).logits, expected, atol=1e-5, rtol=0)


def test_moeut_options_are_checked_by_name(gpt2_dir, tmp_path, capsys):
    cases = {
        ("--expert-size", "0"): "expert_size=0 must be a positive divisor of GPT-2's MLP width 128",
        ("--expert-size", "-32"): "expert_size=-32 must be a positive divisor",
        ("--num-unique-layers", "1"): "exact=True needs num_unique_layers = GPT-2's n_layer (2), got 1",
        ("--num-unique-layers", "0"): "needs num_unique_layers = GPT-2's n_layer (2), got 0",
    }
    for options, message in cases.items():
        with pytest.raises(SystemExit):
            run("gpt2_to_moeut", gpt2_dir, tmp_path / "out", *options)
        assert message in capsys.readouterr().err, options
    assert not (tmp_path / "out").exists()
