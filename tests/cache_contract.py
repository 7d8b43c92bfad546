"""Generation with every cache implementation transformers offers, against the default dynamic cache, shared by the
test files of the architectures (ModuleFormer refuses fixed-size caches, so it takes the quantized one only).

Tolerances: the static cache computes on padded, fixed-size key tensors, so its logits differ from the dynamic
cache's by float rounding only (1e-5 allowed, fp32) and its greedy tokens are identical. The quantized cache stores
keys and values in fp8 (3 mantissa bits: errors of ~6% of values of order 0.5), so its logits get 0.1, and a tiny
random model's near-tied logits may then pick another token: logits are compared for as long as both generations
have the same context (up to and including the first step whose token differs).
"""

import torch

CACHE_IMPLEMENTATIONS = {
    "static": ({}, 1e-5),
    "quantized": ({"cache_config": {"backend": "fp8"}}, 0.1),
}


def assert_caches_generate_what_the_dynamic_cache_does(
    model, input_ids, attention_mask, pad_token_id, implementations=tuple(CACHE_IMPLEMENTATIONS)
):
    kwargs = dict(
        attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=pad_token_id,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    dynamic = model.generate(input_ids, **kwargs)
    new_tokens = dynamic.sequences[:, input_ids.shape[1] :]
    for implementation in implementations:
        options, atol = CACHE_IMPLEMENTATIONS[implementation]
        other = model.generate(input_ids, cache_implementation=implementation, **options, **kwargs)
        same = (other.sequences[:, input_ids.shape[1] :] == new_tokens).all(0).tolist()
        if implementation == "static":
            assert all(same), f"static cache tokens {other.sequences.tolist()} != {dynamic.sequences.tolist()}"
        shared_context = same.index(False) + 1 if False in same else len(same)
        for step in range(shared_context):
            message = lambda text: f"{implementation} cache, step {step}: {text}"  # noqa: E731
            torch.testing.assert_close(other.logits[step], dynamic.logits[step], atol=atol, rtol=0, msg=message)
