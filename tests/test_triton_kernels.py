"""The Triton kernels (`modeling_mom/triton_kernels.py`: the dispatch's grouped matmul on GPUs without a fused
`grouped_mm`, and stick-breaking attention) equal the PyTorch paths, forward and backward.

No GPU is needed: the kernels are imported with `TRITON_INTERPRET=1` (which Triton reads when it decorates them),
so they run on CPU tensors through Triton's interpreter, which executes the same kernel code (program ids, masks,
block loads, `tl.dot`, scans, atomic adds) with NumPy. What the interpreter cannot show, the GPU compilation, is
checked ahead of time: every kernel at its largest tiles compiles to a GPU binary for Turing, Ampere/Ada and Hopper
with Triton's bundled compiler, within those GPUs' shared memory. Where CUDA is available, every test also runs with
the kernels compiled, on the GPU (and bf16 too).

Half precision is checked in fp16 by the interpreter: its `tl.dot` of bf16 operands returns garbage (NumPy has no
bf16; loads and stores of bf16 are exact), while the compiled kernel treats the two 16-bit types alike.

Tolerances: fp32 `1e-5` absolute and relative (sums of at most 64 products of O(1) numbers, rounded in another order
than MKL's: measured errors ~1e-6); fp16 `1e-2` of the largest value (outputs round to fp16, eps 9.8e-4; the kernels
accumulate in fp32 as the loop's matmuls do). Stick-breaking attention: `1e-5` (fp32 on both sides; the kernel's log
space and the blocked kernel's products agree to ~1e-7 per weight). Models: logits and every parameter gradient
within `1e-5` of the path without the kernels.
"""

import importlib
import sys

import pytest
import torch

from modeling_mom import moe_dispatch, stickbreaking_attention
from modeling_mom.moe_dispatch import grouped_linear, plan_dispatch

from .test_moduleformer import tiny_model as tiny_moduleformer
from .test_moeut import tiny_config as tiny_moeut_config
from .test_mom import tiny_config as tiny_mom_config

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def triton_kernels(device):
    """`modeling_mom.triton_kernels`, its kernels interpreted on CPU (Triton reads `TRITON_INTERPRET` when it decorates
    a kernel and again inside its language functions, so it stays set while these tests run) or compiled on CUDA;
    removed from `sys.modules` afterwards, so that the next import decorates them afresh."""
    pytest.importorskip("triton")
    sys.modules.pop("modeling_mom.triton_kernels", None)
    with pytest.MonkeyPatch.context() as patch:
        if device.type == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        yield importlib.import_module("modeling_mom.triton_kernels")
    sys.modules.pop("modeling_mom.triton_kernels", None)


def _routed_rows(num_tokens, num_experts, k, in_features, empty_expert, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    selected = torch.randint(0, num_experts, (num_tokens, k), generator=generator)
    if empty_expert is not None:
        selected[selected == empty_expert] = (empty_expert + 1) % num_experts
    plan = plan_dispatch(selected.to(device), num_experts)
    x = torch.randn(plan.token_index.shape[0], in_features, generator=generator).to(device, dtype)
    return plan, x.requires_grad_()


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=CUDA)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize(
    "num_tokens, num_experts, k, in_features, out_features, empty_expert",
    [
        (37, 5, 2, 40, 70, 3),  # counts not multiples of the row block, features not of the column blocks
        (300, 3, 2, 16, 24, None),  # ~200 rows per expert: 64-row blocks, several per expert
        (9, 12, 1, 33, 130, 0),  # fewer rows than experts: many empty experts
    ],
)
def test_triton_grouped_linear_equals_loop(
    triton_kernels, device, dtype, num_tokens, num_experts, k, in_features, out_features, empty_expert
):
    if device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 tl.dot is broken (module docstring)")
    plan, x = _routed_rows(num_tokens, num_experts, k, in_features, empty_expert, dtype, device)
    weight = torch.randn(num_experts, in_features, out_features).to(device, dtype).requires_grad_()
    expected = grouped_linear(x, weight, plan, use_grouped_mm=False)
    out = triton_kernels.triton_grouped_linear(x, weight, plan.offsets, plan.counts)
    scale = expected.abs().max().item()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, atol=tol * scale, rtol=tol)
    grad_out = torch.randn(out_features).to(device, dtype).expand_as(out)  # stride 0, as a sum's gradient arrives
    expected_grads = torch.autograd.grad(expected, (x, weight), grad_out)
    grads = torch.autograd.grad(out, (x, weight), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=tol * expected_grad.abs().max().item(), rtol=tol)
    if empty_expert is not None:
        assert grads[1][empty_expert].abs().max() == 0  # written as zeros, not left uninitialised


def test_strided_operands_and_no_rows(triton_kernels, device):
    """Operands read through their strides (a transposed weight bank, rows that are a column slice), and a plan that
    keeps no rows (every choice SKIP): an empty output and a zero weight gradient."""
    plan, x = _routed_rows(40, 4, 2, 24, None, torch.float32, device)
    wide = torch.randn(x.shape[0], 48, device=device)
    x = wide[:, 8:32].requires_grad_()  # row stride 48
    weight = torch.randn(4, 20, 24, device=device).transpose(1, 2).requires_grad_()  # [E, in=24, out=20], strided
    expected = grouped_linear(x, weight, plan, use_grouped_mm=False)
    out = triton_kernels.triton_grouped_linear(x, weight, plan.offsets, plan.counts)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(torch.autograd.grad(out.sum(), (x, weight)),
                                   torch.autograd.grad(expected.sum(), (x, weight))):  # fmt: skip
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    skipped = plan_dispatch(torch.full((5, 2), 4, device=device), 4)
    empty = torch.zeros(0, 24, device=device, requires_grad=True)
    out = triton_kernels.triton_grouped_linear(empty, weight, skipped.offsets, skipped.counts)
    assert out.shape == (0, 20)
    (grad_weight,) = torch.autograd.grad(out.sum(), weight)
    assert torch.equal(grad_weight, torch.zeros_like(weight))


def test_row_blocks_stay_inside_one_expert(triton_kernels, device):
    plan, _ = _routed_rows(200, 7, 3, 8, 2, torch.float32, device)
    blocks = triton_kernels.RowBlocks(plan.offsets, plan.counts)
    starts, experts = blocks.block_start.tolist(), blocks.block_expert.tolist()
    ends = plan.offsets.tolist()
    covered = []
    for start, expert in zip(starts, experts):
        assert ends[expert] - plan.counts[expert] <= start < ends[expert]
        covered.extend(range(start, min(start + blocks.block_m, ends[expert])))
    assert covered == list(range(sum(plan.counts)))  # every sorted row in exactly one block, in order
    assert 2 not in experts


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["moeut", "moduleformer", "mom"])
def test_model_trains_the_same_through_triton(triton_kernels, device, monkeypatch, arch):
    """Every grouped linear of a model (MoEUT's V, O and FFN experts; ModuleFormer's attention and FFN experts; MoM's
    attention and FFN modules under learned routing with two modules per token) and ModuleFormer's stick-breaking
    attention through the Triton kernels: same logits and parameter gradients as without them
    (`MODELING_MOM_TRITON=0`)."""
    from modeling_mom import MoEUTForCausalLM, MoMForCausalLM

    torch.manual_seed(0)
    if arch == "moeut":
        model = MoEUTForCausalLM(tiny_moeut_config())
    elif arch == "mom":
        model = MoMForCausalLM(tiny_mom_config(num_modules_per_tok=2))
    else:
        model = tiny_moduleformer()
    model.to(device)
    ids = torch.randint(2, model.config.vocab_size, (2, 7), device=device)
    with monkeypatch.context() as without_triton:
        without_triton.setenv("MODELING_MOM_TRITON", "0")
        expected_logits, expected_grads = _loss_and_grads(model, ids)
    calls = []

    def triton_everywhere(*tensors):
        calls.append(tensors[0].shape)
        return True

    monkeypatch.setattr(moe_dispatch, "_triton_wins", triton_everywhere)
    monkeypatch.setattr(stickbreaking_attention, "_triton_wins", triton_everywhere)
    logits, grads = _loss_and_grads(model, ids)
    assert calls, "the Triton path was not taken"
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_kernel_works_probe(triton_kernels, device, monkeypatch):
    """The once-per-(kernel, device, dtype) probe: True where a kernel runs; where it fails (as on a GPU or Triton
    version it does not compile for), False, so its caller takes the PyTorch path."""
    triton_kernels.kernel_works.cache_clear()
    with torch.inference_mode():  # as under a pipeline: the probe's backward must still run
        assert triton_kernels.kernel_works("grouped_linear", device, torch.float32)
        assert triton_kernels.kernel_works("stick_breaking", device, torch.float32, 12)
    generator_state = torch.get_rng_state()

    def fail(*args, **kwargs):
        raise RuntimeError("ptxas fatal: unsupported")

    monkeypatch.setattr(triton_kernels.RowBlocks, "matmul", fail)
    monkeypatch.setattr(triton_kernels, "_TritonStickBreaking", fail)
    assert not triton_kernels.kernel_works("grouped_linear", device, torch.float16)
    assert not triton_kernels.kernel_works("stick_breaking", device, torch.float16, 12)
    assert torch.equal(torch.get_rng_state(), generator_state)
    with pytest.raises(KeyError):  # a misspelt kernel is an error, not a silent fallback
        triton_kernels.kernel_works("grouped_linaer", device, torch.float32)
    triton_kernels.kernel_works.cache_clear()


def test_triton_is_only_chosen_on_cuda():
    x, weight = torch.zeros(4, 8), torch.zeros(2, 8, 8)
    assert not moe_dispatch.triton_usable(x) and not moe_dispatch._triton_wins(x, weight)
    query, key = torch.zeros(1, 1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    assert not stickbreaking_attention._triton_wins(query, key, key)


def _attention_inputs(device, dtype, batch=2, heads=2, groups=2, seq_len=37, cached=8, head_dim=12, seed=0):
    """Left-padded inputs with `cached` positions of history: keys `[B, H, S, D]`, `S = cached + seq_len`."""
    generator = torch.Generator().manual_seed(seed)
    key_len = cached + seq_len
    query = torch.randn(batch, heads, groups, seq_len, head_dim, generator=generator) * 2
    key = torch.randn(batch, heads, key_len, head_dim, generator=generator)
    value = torch.randn(batch, heads, key_len, head_dim, generator=generator)
    mask = torch.ones(batch, key_len, dtype=torch.bool)
    mask[1, :11] = False  # the second sequence starts after the cached part: padded queries too
    tensors = [t.to(device, dtype).requires_grad_() for t in (query, key, value)]
    return (*tensors, mask.to(device))


@pytest.mark.parametrize("attend_current", [True, False], ids=["moduleformer", "tan2024"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_triton_stick_breaking_equals_pytorch(triton_kernels, device, attend_current, padded):
    """The fused kernel (16-row tiles: several query blocks and key blocks, a partial last one, a cached history,
    query groups, a head size that is not a power of two) against the blocked PyTorch kernel: outputs, the row sums
    of the weights (read off the materialised weights) and the gradients of query, key and value."""
    query, key, value, mask = _attention_inputs(device, torch.float32)
    mask = mask if padded else None
    expected, weights = stickbreaking_attention.stick_breaking_attention(
        query, key, value, mask, attend_current=attend_current, output_weights=True
    )
    padding = None if mask is None else ~mask
    out, rowsum = triton_kernels.triton_stick_breaking(query, key, value, padding, attend_current, block_size=16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rowsum, weights.sum(-1).view(rowsum.shape), atol=1e-5, rtol=1e-5)
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=generator).to(device)
    grad_rowsum = torch.randn(rowsum.shape, generator=generator).to(device)
    expected_loss = (expected * grad_out).sum() + (weights.sum(-1).view(rowsum.shape) * grad_rowsum).sum()
    expected_grads = torch.autograd.grad(expected_loss, (query, key, value))
    grads = torch.autograd.grad((out * grad_out).sum() + (rowsum * grad_rowsum).sum(), (query, key, value))
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5, msg=name)
    assert torch.isfinite(out).all() and all(torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("block_size", [8, 48])
def test_stick_breaking_block_size_is_checked(triton_kernels, block_size):
    with pytest.raises(ValueError, match=f"block_size={block_size}: .* power of two >= 16"):
        triton_kernels.stick_breaking_tiles(torch.float32, 8, 8, 16, block_size)


@pytest.mark.parametrize("variant", ["stickbreaking", "stickbreaking_2024"])
@pytest.mark.parametrize("seq_len, cached", [(9, 3), (1, 70)], ids=["prompt", "decoding"])
def test_stick_breaking_attention_through_triton(triton_kernels, device, monkeypatch, variant, seq_len, cached):
    """`stick_breaking_attention` with the kernel chosen, as on a GPU (the remainder of Tan et al.'s variant added
    from the kernel's row sums), at its default tiles (decoding: 16 query rows against three 32-key tiles): the
    output and gradients of the PyTorch path."""
    query, key, value, mask = _attention_inputs(device, torch.float32, seq_len=seq_len, cached=cached)
    options = dict(attend_current=variant == "stickbreaking", remainder_to_current=variant == "stickbreaking_2024")
    expected, _ = stickbreaking_attention.stick_breaking_attention(query, key, value, mask, **options)
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    monkeypatch.setattr(stickbreaking_attention, "_triton_wins", lambda *tensors: True)
    out, _ = stickbreaking_attention.stick_breaking_attention(query, key, value, mask, **options)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(torch.autograd.grad(out.square().sum(), (query, key, value)), expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_saved_code_carries_the_kernels_without_requiring_triton(tmp_path):
    """A ModuleFormer checkpoint's code includes `triton_kernels.py` (imported lazily by the dispatch and the
    attention), and transformers' check of a remote-code checkpoint's imports does not ask for Triton (its import is
    guarded)."""
    from transformers.dynamic_module_utils import get_imports

    tiny_moduleformer().save_pretrained(tmp_path)
    assert (tmp_path / "triton_kernels.py").exists()
    for name in ("triton_kernels.py", "moe_dispatch.py", "stickbreaking_attention.py"):
        assert "triton" not in get_imports(tmp_path / name)


# GPU targets to compile for, with the shared memory a block may use there: Turing (sm75: T4) 64 KB; consumer Ampere
# and Ada (sm86, sm89: RTX 3090/4090, A10, L4) 99 KB, the least of the cards since Ampere; Hopper (sm90) 227 KB.
GPU_TARGETS = {"sm75": (75, 65536), "sm86": (86, 101376), "sm90": (90, 232448)}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module")
def compiled_kernels():
    """`modeling_mom.triton_kernels` imported for compilation (`TRITON_INTERPRET` unset, which the interpreted tests'
    fixture may hold set), without replacing the module those tests import."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    interpreted = sys.modules.pop("modeling_mom.triton_kernels", None)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        module = importlib.import_module("modeling_mom.triton_kernels")
    sys.modules.pop("modeling_mom.triton_kernels")
    if interpreted is not None:
        sys.modules["modeling_mom.triton_kernels"] = interpreted
    return module


def _compile_for_gpu(kernel, dtype, constexprs, capability, options):
    """Compile `kernel` ahead of time for an NVIDIA GPU of compute `capability` (Triton's bundled ptxas, no GPU
    needed): pointers to `dtype`, but for the fp32 and integer buffers that the launches pass."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fixed = {"block_expert_ptr": "*i64", "block_start_ptr": "*i64", "expert_end_ptr": "*i64",
             "expert_start_ptr": "*i64", "pad_ptr": "*u8", "rowsum_ptr": "*fp32", "grad_rowsum_ptr": "*fp32",
             "grad_total_ptr": "*fp32", "grad_q_ptr": "*fp32", "grad_k_ptr": "*fp32",
             "grad_v_ptr": "*fp32"}  # fmt: skip
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = fixed.get(param.name, "*" + DTYPE_NAMES[dtype])
        else:
            signature[param.name] = "fp32" if param.name == "scale" else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


@pytest.mark.parametrize("target", list(GPU_TARGETS))
@pytest.mark.parametrize("precision", ["fp32", "16-bit"])
def test_kernels_compile_for_gpus(compiled_kernels, target, precision, monkeypatch, tmp_path):
    """Every kernel, at the largest tiles the launches use there (grouped linear: 64-row blocks; stick-breaking:
    128-wide heads, long sequences, forward and backward), compiles to a GPU binary for Turing, Ampere/Ada and Hopper
    (16-bit: fp16 on Turing, which has no bf16, bf16 on the others), within the shared memory of a block there. The
    interpreter checks what the kernels compute; this, that a GPU's compiler takes them and that they fit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # not the user's ~/.triton
    capability, shared_limit = GPU_TARGETS[target]
    dtype = torch.float32 if precision == "fp32" else torch.float16 if capability < 80 else torch.bfloat16
    precision = compiled_kernels._input_precision(dtype)
    grouped = dict(BLOCK_K=compiled_kernels._BLOCK_K, INPUT_PRECISION=precision)
    tiles = compiled_kernels.stick_breaking_tiles(dtype, 4096, 4096, 128, shared_memory=shared_limit)
    stick_breaking = {"num_stages": compiled_kernels.STICK_BREAKING_STAGES}
    launches = [
        (compiled_kernels._grouped_matmul_kernel, dict(BLOCK_M=64, BLOCK_N=compiled_kernels._BLOCK_N, **grouped), {}),
        (compiled_kernels._grouped_weight_grad_kernel,
         dict(BLOCK_IN=compiled_kernels._BLOCK_N, BLOCK_OUT=compiled_kernels._BLOCK_N, BLOCK_ROWS=grouped["BLOCK_K"],
              INPUT_PRECISION=precision), {}),
    ] + [
        (compiled_kernels._stick_breaking_kernel,
         dict(**tiles, ATTEND_CURRENT=True, HAS_PADDING=True, BACKWARD=backward, INPUT_PRECISION=precision),
         stick_breaking)
        for backward in (False, True)
    ]  # fmt: skip
    for kernel, constexprs, options in launches:
        binary = _compile_for_gpu(kernel, dtype, constexprs, capability, options)
        assert binary.asm["cubin"], kernel.__name__
        assert binary.metadata.shared <= shared_limit, (kernel.__name__, constexprs, binary.metadata.shared)
