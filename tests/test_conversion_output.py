"""Every converter's command line writes its checkpoint all or nothing (`conversion/checkpoint_writer.py`): a
non-empty `--out` is replaced only with `--overwrite`, and a failure while writing leaves neither a partial checkpoint
nor a damaged earlier one, nor the staging directory."""

import importlib
import os

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
