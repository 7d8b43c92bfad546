"""The remote-code contract shared by the architectures' test files: a saved checkpoint loads through all six Auto
classes with `trust_remote_code=True` in a fresh process where `modeling_mom` cannot be imported, and computes what
the in-package model computes."""

import os
import subprocess
import sys
import textwrap

import torch

REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mom"] = None  # the package must not be importable: only the saved code may run
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    path, prefix = sys.argv[1], sys.argv[2]
    inputs = torch.load(path + "/inputs.pt")
    assert type(AutoConfig.from_pretrained(path, trust_remote_code=True)).__name__ == prefix + "Config"
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(lm).__module__.startswith("transformers_modules"), type(lm).__module__
    torch.save(lm(**inputs).logits, path + "/remote_logits.pt")
    generated = lm.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.save(generated, path + "/remote_generated.pt")
    assert type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__ == prefix + "Model"
    classifier = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=2)
    assert classifier(**inputs).logits.shape == (inputs["input_ids"].shape[0], 2)
    tagger = AutoModelForTokenClassification.from_pretrained(path, trust_remote_code=True, num_labels=5)
    assert tagger(**inputs).logits.shape == (*inputs["input_ids"].shape, 5)
    reader = AutoModelForQuestionAnswering.from_pretrained(path, trust_remote_code=True)
    assert reader(**inputs).start_logits.shape == inputs["input_ids"].shape
    """
)


def assert_remote_code_load_matches(model, input_ids, attention_mask, path, atol=1e-6):
    """Save `model` (a causal LM, eval mode) to `path` and check the contract on a (left-padded) batch: same logits
    (within `atol`: the same code on the same weights, in another process) and the same 5 greedy tokens."""
    model.save_pretrained(path)
    for name in os.listdir(path):
        if name.endswith(".py"):
            source = (path / name).read_text()
            assert "from .." not in source and "import modeling_mom" not in source, name
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, path / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(path / "modules")}
    env.pop("PYTHONPATH", None)
    prefix = type(model.config).__name__.removesuffix("Config")
    subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(path), prefix], env=env, cwd="/", check=True)
    expected = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(torch.load(path / "remote_logits.pt"), expected, atol=atol, rtol=atol)
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
                               pad_token_id=0)  # fmt: skip
    assert torch.equal(torch.load(path / "remote_generated.pt"), generated)
