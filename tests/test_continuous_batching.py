"""transformers' continuous batching (`generate_batch`, `generate(cache_implementation="paged")`): the attention
layers hand the paged cache the keyword arguments it needs (as Llama's do), so each request gets the tokens plain
greedy generation gives it. Before, every request failed inside the batching loop, which only logs, and returned
no tokens. ModuleFormer refuses it (see test_moduleformer)."""

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from modeling_mom import MoEUTForCausalLM, MoMForCausalLM

from . import test_moeut, test_mom

MODELS = {
    "mom": lambda: MoMForCausalLM(test_mom.tiny_config(num_modules_per_tok=2)),
    "moeut": lambda: MoEUTForCausalLM(test_moeut.tiny_config()),
}


@pytest.mark.parametrize("arch", MODELS)
def test_generate_batch_gives_each_request_its_greedy_tokens(arch):
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    small_cache = ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=32)  # sized to the test
    results = model.generate_batch(prompts, config, continuous_batching_config=small_cache, warmup=False)
    assert len(results) == len(prompts)
    for prompt, result in zip(prompts, results.values()):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert result.generated_tokens == expected[0, len(prompt) :].tolist()
