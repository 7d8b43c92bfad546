"""What every converter does alike: its command line writes the checkpoint all or nothing
(`conversion/checkpoint_writer.py`: a non-empty `--out` is replaced only with `--overwrite`, and a failure while
writing leaves neither a partial checkpoint nor a damaged earlier one, nor the staging directory); it refuses sources
it cannot convert, naming the problem; and it carries GPT-2's token ids over."""

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


@pytest.mark.parametrize("name", CONVERTERS)
def test_outputs_that_cannot_be_written_or_would_delete_the_source_are_refused(name, gpt2_dir, tmp_path, capsys):
    """`--overwrite` into the source GPT-2 (or a directory holding it) replaced the source with the conversion; an
    `--out` below a file failed with a FileExistsError after converting. Both are refused first, and nothing moves."""
    (tmp_path / "afile").write_text("")
    before = sorted(p.name for p in gpt2_dir.iterdir())
    cases = {
        str(gpt2_dir): "is the source checkpoint",
        str(tmp_path): "is the source checkpoint",
        str(tmp_path / "afile" / "sub"): "afile exists and is not a directory",
    }
    for out, message in cases.items():
        with pytest.raises(SystemExit):
            run(name, gpt2_dir, out, "--overwrite")
        assert message in capsys.readouterr().err, out
    assert sorted(p.name for p in gpt2_dir.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "gpt2"]


@pytest.mark.parametrize("name", CONVERTERS)
def test_an_output_in_a_read_only_location_is_refused_before_converting(name, gpt2_dir, tmp_path, monkeypatch, capsys):
    """A read-only `--out` location failed with a PermissionError traceback after the whole conversion. Root may
    write anywhere but on read-only filesystems, so the location's refusal is simulated where the probe writes."""
    from modeling_mom.workflows import common

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    probe = common.tempfile.TemporaryDirectory

    def refusing_probe(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == read_only:
            raise PermissionError(13, "Permission denied")
        return probe(*args, dir=dir, **kwargs)

    monkeypatch.setattr(common.tempfile, "TemporaryDirectory", refusing_probe)
    monkeypatch.setattr(checkpoint_writer, "save_converted", lambda *args: pytest.fail("converted and saved"))
    for out in (read_only / "new", read_only / "new" / "deeper"):
        with pytest.raises(SystemExit):
            run(name, gpt2_dir, out)
        assert f"--out {out}: cannot write in {read_only} (Permission denied)" in capsys.readouterr().err
    assert not list(read_only.iterdir())


@pytest.mark.parametrize("name", CONVERTERS)
def test_tokenizer_files_that_do_not_load_are_refused_before_converting(name, gpt2_dir, tmp_path, capsys):
    """They were copied as they were (`mom convert` then said both that there was no tokenizer and which files it
    had copied, and exited 0); every training command failed on the converted checkpoint."""
    (gpt2_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(SystemExit):
        run(name, gpt2_dir, tmp_path / "out")
    assert f"the tokenizer files in {gpt2_dir} do not load (JSONDecodeError: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", CONVERTERS)
def test_seed_and_a_wrongly_typed_gpt2_config_are_refused_by_name(name, gpt2_dir, tmp_path, capsys):
    for seed in ("-1", str(2**32)):
        with pytest.raises(SystemExit):
            run(name, gpt2_dir, tmp_path / "out", "--seed", seed)
        assert f"seed={seed} must be an integer in [0, 2**32 - 1]" in capsys.readouterr().err
    config = (gpt2_dir / "config.json").read_text()
    (gpt2_dir / "config.json").write_text(config.replace('"n_layer": 2', '"n_layer": 2.0'))
    with pytest.raises(SystemExit):
        run(name, gpt2_dir, tmp_path / "out")
    assert f"{gpt2_dir} has an invalid config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_moduleformer_expert_noise_must_be_finite_and_non_negative(gpt2_dir, tmp_path, capsys):
    """-1 and nan were taken as 0 (no noise), inf wrote non-finite weights."""
    for noise in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            run("gpt2_to_moduleformer", gpt2_dir, tmp_path / "out", "--expert-noise", noise)
        assert f"expert_noise={float(noise)} must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

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
    """A missing directory, a directory without weights, weights lacking layers (which would load randomly
    initialised), a damaged weights file and weights of other shapes than the config's are usage errors naming the
    problem; a GPT-2 saved without its head (`GPT2Model`) converts."""
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((gpt2_dir / "config.json").read_text())
    fewer_layers = tmp_path / "fewer_layers"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=16, n_embd=32, n_layer=1, n_head=4)).save_pretrained(
        fewer_layers
    )
    (fewer_layers / "config.json").write_text((gpt2_dir / "config.json").read_text())  # says n_layer=2
    (tmp_path / "no_config").mkdir()
    damaged, narrower = tmp_path / "damaged", tmp_path / "narrower"  # were tracebacks
    damaged.mkdir()
    (damaged / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
    GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=16, n_embd=16, n_layer=2, n_head=4)).save_pretrained(narrower)
    (narrower / "config.json").write_text((gpt2_dir / "config.json").read_text())  # says n_embd=32
    cases = {
        tmp_path / "missing": "is not a GPT-2 checkpoint directory or a reachable hub id",
        tmp_path / "no_config": "has no config.json, so it is not a saved model",  # was "Unrecognized model"
        no_weights: "cannot load GPT-2 weights from",
        fewer_layers: "weights lack 12 tensor(s) its config needs: transformer.h.1.attn.c_attn.bias, ",
        damaged: f"cannot load GPT-2 weights from {damaged}: SafetensorError: ",
        narrower: f"cannot load GPT-2 weights from {narrower}: RuntimeError: ",
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


EXACT = {  # converter module -> convert() keywords of its exact form for a GPT-2 of n_embd 32
    "gpt2_to_mom": dict(exact=True),
    "gpt2_to_moeut": dict(exact=True, expert_size=32),
    "gpt2_to_moduleformer": dict(exact=True, num_experts=4),
}


@pytest.mark.parametrize("name", CONVERTERS)
def test_token_ids_are_carried_so_generation_infers_the_same_mask(name, tmp_path):
    """Without an attention mask, `generate` masks `config.pad_token_id`: MoEUT's and ModuleFormer's conversions
    dropped GPT-2's pad id, so they attended to a left-padded row's padding and decoded other tokens."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=61, n_positions=40, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    gpt2 = GPT2LMHeadModel(config).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    model = importlib.import_module(f"conversion.{name}").convert(tmp_path / "gpt2", **EXACT[name])
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    ids = torch.randint(3, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    ids[1, :4] = 0
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **settings), gpt2.generate(ids, **settings))


@pytest.mark.parametrize("name", CONVERTERS)
@pytest.mark.parametrize(
    "field, value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                     ("add_cross_attention", True)]
)  # fmt: skip
def test_a_gpt2_computation_no_converted_model_has_is_refused_by_name(name, field, value, tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8, n_positions=16, n_embd=32, n_layer=2, n_head=4, **{field: value})
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=f"{field}={value}"):
        importlib.import_module(f"conversion.{name}").convert(tmp_path / "gpt2", **EXACT[name])


def test_moduleformer_conversion_keeps_gpt2s_dropout(tmp_path):
    """ModuleFormer's embedding and residual dropouts are GPT-2's `embd_pdrop` and `resid_pdrop` (reset to 0 before)."""
    from conversion.gpt2_to_moduleformer import moduleformer_config

    config = moduleformer_config(GPT2Config(n_layer=2, embd_pdrop=0.15, resid_pdrop=0.2), exact=True, slice_mlp=False)
    assert (config.embd_dropout, config.resid_dropout) == (0.15, 0.2)


@pytest.mark.parametrize("name", CONVERTERS)
def test_converting_leaves_the_callers_random_state_alone(name, gpt2_dir):
    """`convert(seed=...)` seeds the model's initialisation on its own random state: the caller's global generator
    continues as if nothing had been drawn, and the seed alone decides the result."""
    converter = importlib.import_module(f"conversion.{name}")
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = converter.convert(gpt2_dir, **EXACT[name], seed=7)
    assert torch.equal(torch.rand(4), expected_next)
    second = converter.convert(gpt2_dir, **EXACT[name], seed=7)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
