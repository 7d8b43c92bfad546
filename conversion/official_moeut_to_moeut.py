"""Convert a checkpoint of the MoEUT paper's training code (e.g. the released `checkpoints/C4_44M.ckpt`) to ours.

    python -m conversion.official_moeut_to_moeut --src CKPT --out DIR [--overwrite] [--dtype float32]
        [--tokenizer SPM_MODEL]

The training code (RobertCsordas/moeut_training_code) saves one `torch.save` file per checkpoint: a dict whose
"model" entry is the language model's `state_dict()` and whose "run_invariants"["args"] is the run's command line,
one flat entry per argument ("state_size", "transformer.variant", "moe.n_experts", ...; values as given on the
command line or the argument's default, e.g. "none" or "82" for the int-or-none arguments). Other entries ("state",
"sampler", "scaler", "interface", "optimizer") are training state and are ignored. The config is derived from the
arguments; an argument that changes the model in a way this package cannot reproduce is refused, naming it and what
is allowed. An argument missing from the file takes the training code's default, as its own `--restore` does, except
those that set the model's sizes and structure, which must be present.

Supported: the paper's MoEUT, i.e. `transformer.variant` "preln_moe_universal" (G = `transformer.universal.group_size`
shared layers applied A, B, ..., A, B, ...) or "preln_moe" (no sharing), with SwitchHead attention (V and O experts,
dense Q and K, sigmoid routers) and a sigma-MoE feed-forward block (sigmoid router, no biases); `moe.nonorm` 1 gives
our "peri" LayerNorm scheme (the paper's), 0 our "pre". Weights are renamed without transposes (both sides store
experts as `[E, in, out]`); a non-default `transformer.embedding_scale` is folded into the embedding table. The
MoE layers' training statistics (`pkm.iter`, `pkm.kv_sel_counts_100`) are dropped; any other tensor that is not
mapped, or a missing or misshapen one, is an error. Training-time dropouts that this package does not model
(`dropout`, `moe.att.dropout`, selection and layer dropout) are not carried over, with a warning when non-zero.

`--tokenizer` converts the run's SentencePiece model (the released `cache/.../tokenizer.model.model` files) to a
Hugging Face tokenizer saved beside the weights. It needs the `sentencepiece` and `protobuf` packages. The converted
tokenizer is checked against SentencePiece itself on probe strings before anything is written; it adds no BOS/EOS
(the training code never did) and encodes "<s>" typed in text as text, as SentencePiece does. One difference
remains: decoding an unknown piece gives "<unk>", where SentencePiece gives " ⁇ ".

Everything is written all or nothing (`checkpoint_writer.py`).
"""

import argparse
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from modeling_mom import MoEUTConfig, MoEUTForCausalLM

from .checkpoint_writer import add_output_arguments, convert_and_save, listed

# The training code's arguments that the conversion reads: name -> (default, kind). Defaults and kinds are those the
# training code registers (main.py:22-29; tasks/transformer_lm_mixin.py:22-86; tasks/lm_base.py:16); `kind` restates
# its parser ("bool" arguments are stored as 0/1, "*_or_none" ones as strings such as "none" or "82").
ARGUMENTS = {
    "state_size": (128, "int"),
    "embedding_size": ("none", "int_or_none"),
    "dropout": (0.0, "float"),
    "transformer.n_heads": (4, "int"),
    "transformer.variant": ("standard", "str"),
    "transformer.encoder_n_layers": (3, "int"),
    "transformer.head_projection_size": ("none", "int_or_none"),
    "transformer.universal.group_size": (1, "int"),
    "transformer.universal.group_type": ("abab", "str"),
    "transformer.activation": ("relu", "str"),
    "transformer.embedding_scale": ("none", "float_or_none"),
    "transformer.p_drop_layer": (0.0, "float"),
    "lm.unroll": (100, "int"),
    "lm.trafo.context_blocks": (1, "int"),
    "lm.trafo.norm_input": (False, "bool"),
    "rope.rotate_fraction": (0.5, "float"),
    "rope.base": (10000.0, "float"),
    "pkm.n_heads": (1, "int"),
    "moe.n_experts": (128, "int"),
    "moe.expert_size": (128, "int"),
    "moe.selection_mode": ("sigmoid", "str"),
    "moe.perplexity_reg": (0.0, "float"),
    "moe.perplexity_reg_mode": ("step", "str"),
    "moe.activation_after_topk": (False, "bool"),
    "moe.bias": (False, "bool"),
    "moe.sel_bias": (False, "bool"),
    "moe.drop_expert": (0.0, "float"),
    "moe.selection_dropout": (0.0, "float"),
    "moe.nonorm": (False, "bool"),
    "moe.att.enable": (False, "bool"),
    "moe.att.n_experts": (4, "int"),
    "moe.att.k": (2, "int"),
    "moe.att.q_expert": (True, "bool"),
    "moe.att.k_expert": (True, "bool"),
    "moe.att.v_expert": (True, "bool"),
    "moe.att.o_expert": (True, "bool"),
    "moe.att.v_size": ("none", "int_or_none"),
    "moe.att.same_sel": (False, "bool"),
    "moe.att.selection_mode": ("sigmoid", "str"),
    "moe.att.perplexity_reg": ("none", "float_or_none"),
    "moe.att.perplexity_reg_mode": ("none", "str_or_none"),
    "moe.att.drop_expert": ("none", "float_or_none"),
    "moe.att.dropout": (0.0, "float"),
    "moe.att.selection_dropout": (0.0, "float"),
}
# set the model's sizes and structure: never taken from a default
REQUIRED = (
    "state_size", "transformer.n_heads", "transformer.variant", "transformer.encoder_n_layers",
    "transformer.head_projection_size", "pkm.n_heads", "moe.n_experts", "moe.expert_size", "moe.att.enable",
    "moe.att.n_experts", "moe.att.k", "moe.nonorm",
)  # fmt: skip
VARIANTS = ("preln_moe_universal", "preln_moe")
ACTIVATIONS = ("relu", "gelu")  # tasks/transformer_lm_mixin.py:102-113: F.relu, F.gelu
TRAINING_ONLY_DROPOUTS = (
    "dropout", "moe.att.dropout", "moe.selection_dropout", "moe.att.selection_dropout", "transformer.p_drop_layer",
)  # fmt: skip
# MoE training statistics (layers/moe_layer.py:68 `iter`, :109 `kv_sel_counts_100`), not weights
DROPPED = re.compile(r"unique_layers\.\d+\.pkm\.(iter|kv_sel_counts_100)")
DOTDICT = "framework.data_structures.dotdict.DotDict"  # the training state's dict class (a plain dict subclass)


def _parse(name: str, value, kind: str):
    """An argument's value as the training code's parser reads it (framework/helpers/argument_parser.py)."""
    if kind.endswith("_or_none"):
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        kind = kind[: -len("_or_none")]
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.strip().lower() not in {"0", "1", "true", "false", "yes", "no", "y", "n"}:
                    raise ValueError(value)
                return value.strip().lower() in {"1", "true", "yes", "y"}
            return bool(int(value))
        if kind == "int":
            number = float(value)
            if number != int(number):
                raise ValueError(value)
            return int(number)
        return float(value) if kind == "float" else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"training argument {name}={value!r} is not a valid {kind}.") from None


def read_arguments(stored: dict) -> dict:
    """The arguments the conversion reads, parsed, from a checkpoint's `run_invariants["args"]`; missing ones take
    the training code's default, except the REQUIRED ones (a ValueError)."""
    missing = [name for name in REQUIRED if name not in stored]
    if missing:
        raise ValueError(
            f"the checkpoint's arguments lack {missing}; they set the model's sizes and structure and have no safe "
            "default. Is this a MoEUT run of the training code?"
        )
    return {name: _parse(name, stored.get(name, default), kind) for name, (default, kind) in ARGUMENTS.items()}


def _refuse(name: str, value, allowed: str, why: str = "") -> None:
    raise ValueError(f"unsupported training argument {name}={value!r}; allowed: {allowed}.{' ' + why if why else ''}")


def config_from_arguments(args: dict, vocab_size: int) -> tuple[MoEUTConfig, dict]:
    """Our config for a training run's parsed arguments, and how its weights map: {"norm_scheme", "embedding_scale"}.

    Every argument that changes the eval-mode function is either translated or checked to have the value this
    package reproduces; a ValueError names the first that does not.
    """
    variant = args["transformer.variant"]
    if variant not in VARIANTS:
        _refuse("transformer.variant", variant, f"{VARIANTS}", "Post-LN, dense-attention and SUT variants differ.")
    if not args["moe.att.enable"]:
        _refuse("moe.att.enable", 0, "1", "Without it the attention is dense (FastRopeAttention), not SwitchHead.")
    for name, wanted in (("moe.att.q_expert", False), ("moe.att.k_expert", False), ("moe.att.v_expert", True),
                         ("moe.att.o_expert", True)):  # fmt: skip
        if args[name] != wanted:
            _refuse(name, int(args[name]), str(int(wanted)), "SwitchHead here has V and O experts, dense Q and K.")
    checks = [
        ("moe.selection_mode", "sigmoid"), ("moe.att.selection_mode", "sigmoid"), ("moe.activation_after_topk", False),
        ("moe.bias", False), ("moe.sel_bias", False), ("moe.att.same_sel", False), ("embedding_size", None),
        ("lm.trafo.norm_input", False), ("lm.trafo.context_blocks", 0),
    ]  # fmt: skip
    for name, wanted in checks:
        if args[name] != wanted:
            value = int(args[name]) if isinstance(args[name], bool) else args[name]
            allowed = str(int(wanted)) if isinstance(wanted, bool) else repr(wanted)
            why = "It needs Transformer-XL memory, which this package does not have." if "context" in name else ""
            _refuse(name, value, allowed, why)
    if args["transformer.activation"] not in ACTIVATIONS:
        _refuse("transformer.activation", args["transformer.activation"], f"{ACTIVATIONS}")
    sizes = ["state_size", "transformer.n_heads", "transformer.encoder_n_layers", "moe.n_experts", "moe.expert_size",
             "lm.unroll"]  # fmt: skip
    if args["transformer.head_projection_size"] is not None:  # None: state_size // n_heads
        sizes.append("transformer.head_projection_size")
    for name in sizes:
        if isinstance(args[name], bool) or not isinstance(args[name], int) or args[name] < 1:
            _refuse(name, args[name], "a positive integer")  # named as the training code names it (d // 0 before)
    d, heads, layers = args["state_size"], args["transformer.n_heads"], args["transformer.encoder_n_layers"]
    head_dim = args["transformer.head_projection_size"] or d // heads  # full_moe_relative_attention.py:235
    if args["moe.att.v_size"] not in (None, head_dim):
        _refuse("moe.att.v_size", args["moe.att.v_size"], f"none or {head_dim} (the head width)")
    if variant == "preln_moe_universal":
        group = args["transformer.universal.group_size"]
        if group < 1 or layers % group:
            _refuse("transformer.universal.group_size", group, f"a divisor of encoder_n_layers={layers}")
        if group > 1 and args["transformer.universal.group_type"] != "abab":
            _refuse("transformer.universal.group_type", args["transformer.universal.group_type"], "'abab'",
                    "The layers are applied A, B, ..., A, B, ... here.")  # fmt: skip
    else:
        group = layers  # a distinct layer per step (transformer_lm_mixin.py:233)
    if args["moe.att.n_experts"] < 2:
        _refuse("moe.att.n_experts", args["moe.att.n_experts"], "2 or more")
    if not 1 <= args["moe.att.k"] <= args["moe.att.n_experts"]:
        _refuse("moe.att.k", args["moe.att.k"], f"1..moe.att.n_experts={args['moe.att.n_experts']}")
    if not 1 <= args["pkm.n_heads"] <= args["moe.n_experts"]:
        _refuse("pkm.n_heads", args["pkm.n_heads"], f"1..moe.n_experts={args['moe.n_experts']}")
    att_reg = args["moe.att.perplexity_reg"]
    att_reg = args["moe.perplexity_reg"] if att_reg is None else att_reg  # relative_moe_transformer.py:60
    att_mode = args["moe.att.perplexity_reg_mode"] or args["moe.perplexity_reg_mode"]  # ... .py:69
    for name, coef, mode in (("moe.perplexity_reg_mode", args["moe.perplexity_reg"], args["moe.perplexity_reg_mode"]),
                             ("moe.att.perplexity_reg_mode", att_reg, att_mode)):  # fmt: skip
        if coef > 0 and mode != "layers_time":
            _refuse(name, mode, "'layers_time' (while its regulariser weight is positive)",
                    "It is the only pooling of the entropy regulariser this package implements.")  # fmt: skip
    # RoPE on the first int(rotate_fraction * head_dim) dims, rounded down to even (full_moe_relative_attention.py:643)
    fraction = args["rope.rotate_fraction"]
    if not 0 <= fraction <= 1:
        _refuse("rope.rotate_fraction", fraction, "0..1")
    rotary = int(fraction * head_dim)
    rotary -= rotary % 2
    att_drop = args["moe.att.drop_expert"]  # transformer_lm_mixin.py:189
    fields = dict(
        vocab_size=vocab_size, hidden_size=d, num_hidden_layers=layers, num_unique_layers=group,
        num_attention_heads=heads, head_dim=head_dim, num_attention_experts=args["moe.att.n_experts"],
        num_attention_experts_per_tok=args["moe.att.k"], num_experts=args["moe.n_experts"],
        num_experts_per_tok=args["pkm.n_heads"], moe_intermediate_size=args["moe.expert_size"],
        hidden_act=args["transformer.activation"], expert_dropout=args["moe.drop_expert"],
        attention_expert_dropout=args["moe.drop_expert"] if att_drop is None else att_drop,
        attention_output_dropout=0.0, norm_scheme="peri" if args["moe.nonorm"] else "pre", layer_norm_eps=1e-5,
        rope_theta=args["rope.base"], router_aux_loss_coef=args["moe.perplexity_reg"],
        attention_router_aux_loss_coef=att_reg, max_position_embeddings=args["lm.unroll"], lm_head_bias=True,
        tie_word_embeddings=False,
    )  # fmt: skip
    config = MoEUTConfig(**fields, partial_rotary_factor=fraction if rotary else 0.0)
    if config.num_rotary_dims != rotary:  # our rounding of fraction * head_dim differs at an exact integer
        config = MoEUTConfig(**fields, partial_rotary_factor=rotary / head_dim)
    if config.num_rotary_dims != rotary:
        raise ValueError(f"rope.rotate_fraction={fraction} rotates {rotary} dims of {head_dim}, which "
                         f"partial_rotary_factor cannot express (it gives {config.num_rotary_dims}).")  # fmt: skip
    dropped = [f"{name}={args[name]}" for name in TRAINING_ONLY_DROPOUTS if args[name]]
    if dropped:
        warnings.warn(f"training-time dropouts not carried over (no effect in eval mode): {', '.join(dropped)}.",
                      stacklevel=2)  # fmt: skip
    scale = args["transformer.embedding_scale"]
    # preln: the embedding is not scaled (transformer_lm_mixin.py:320-327, transformer_language_model.py:241)
    return config, {"norm_scheme": config.norm_scheme, "embedding_scale": 1.0 if scale is None else scale}


def weight_map(num_unique_layers: int, norm_scheme: str) -> dict[str, str]:
    """Training-code tensor name -> ours, for every weight of a supported checkpoint."""
    mapping = {
        "embedding.weight": "model.embed_tokens.weight",
        "output.weight": "lm_head.weight",
        "output.bias": "lm_head.bias",
        "out_norm.weight": "model.norm.weight",
        "out_norm.bias": "model.norm.bias",
    }
    # peri (moe.nonorm=1): `self_attn.norm` feeds Q, K and the routers, `pkm.norm` the FFN router
    # (relative_moe_transformer.py:93-122); pre: `norm1` / `norm2` feed whole sub-layers (:127-128, :141-149)
    norms = ("self_attn.norm", "pkm.norm") if norm_scheme == "peri" else ("norm1", "norm2")
    per_layer = {
        "self_attn.projections.q": "attention.q_proj.weight",  # [H * dh, d]
        "self_attn.projections.k": "attention.k_proj.weight",
        "self_attn.projections.v": "attention.v_experts",  # [H * E, d, dh], expert e of head h at h * E + e
        "self_attn.projections.o": "attention.o_experts",  # [H * E, dh, d]
        "self_attn.selections.v": "attention.v_router.weight",  # [H * E, d]
        "self_attn.selections.o": "attention.o_router.weight",
        "pkm.keys": "mlp.experts.up_proj",  # [E, d, expert_size]
        "pkm.values": "mlp.experts.down_proj",  # [E, expert_size, d]
        "pkm.expert_sel": "mlp.router.weight",  # [E, d]
    }
    for ours, theirs in zip(("input_layernorm", "post_attention_layernorm"), norms):
        per_layer.update({f"{theirs}.weight": f"{ours}.weight", f"{theirs}.bias": f"{ours}.bias"})
    for g in range(num_unique_layers):
        mapping.update({f"unique_layers.{g}.{k}": f"model.layers.{g}.{v}" for k, v in per_layer.items()})
    return mapping


def load_training_checkpoint(src: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, stored arguments) of a training-code checkpoint file.

    Loaded with `weights_only=True`: the training state's `DotDict` (a plain dict subclass of the training code,
    which need not be installed) is read as a dict; any other Python object is refused by torch and reported.
    """
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"--src {src} is not a file; give a training-code checkpoint such as checkpoints/C4_44M.ckpt.")
    try:
        with torch.serialization.safe_globals([(dict, DOTDICT)]):
            data = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle and zip errors of many kinds; the message is what helps
        raise ValueError(f"{src} could not be read as a training-code checkpoint: {str(error)[:600]}") from None
    if not isinstance(data, dict) or "model" not in data or not isinstance(data.get("run_invariants"), dict):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{src} is not a training-code checkpoint: expected a dict with 'model' and "
                         f"'run_invariants' (saved by framework/helpers/saver.py), got {keys}.")  # fmt: skip
    stored = data["run_invariants"].get("args")
    if not isinstance(stored, dict):
        raise ValueError(f"{src} has no run_invariants['args']: the run's arguments are needed to build the config.")
    state = data["model"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{src}: 'model' is not a state dict (entries {bad[:3]} are not named tensors).")
    return dict(state), stored


def convert(src: str | Path, dtype: torch.dtype | None = None) -> MoEUTForCausalLM:
    """Load the training-code checkpoint file `src` as a `MoEUTForCausalLM` (eval mode).

    `dtype` casts the weights (default: keep the checkpoint's). A ValueError names what does not fit: not a
    checkpoint, an argument missing or unsupported, tensors missing, unexpected or shaped unlike the arguments say.
    """
    state, stored = load_training_checkpoint(src)
    args = read_arguments(stored)
    if "embedding.weight" not in state or state["embedding.weight"].ndim != 2:
        raise ValueError(f"{src}: the state dict has no 2-D embedding.weight; missing [embedding.weight].")
    config, how = config_from_arguments(args, vocab_size=state["embedding.weight"].shape[0])
    mapping = weight_map(config.num_unique_layers, how["norm_scheme"])
    converted, unexpected = {}, []
    for key, tensor in state.items():
        if DROPPED.fullmatch(key):
            continue
        if key not in mapping:
            unexpected.append(key)
            continue
        if key == "embedding.weight" and how["embedding_scale"] != 1.0:
            tensor = tensor * how["embedding_scale"]  # transformer_language_model.py:241, folded
        converted[mapping[key]] = tensor if dtype is None else tensor.to(dtype)
    missing = sorted(k for k, v in mapping.items() if v not in converted)
    if missing or unexpected:
        raise ValueError(
            f"{src}: the weights do not match the MoEUT its arguments describe ({config.num_unique_layers} unique "
            f"layers, norm scheme {how['norm_scheme']!r}): missing [{listed(missing)}], "
            f"unexpected [{listed(sorted(unexpected))}]."
        )
    with torch.device("meta"):
        model = MoEUTForCausalLM(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert set(expected) == set(converted), set(expected) ^ set(converted)
    theirs = {v: k for k, v in mapping.items()}
    misshapen = [f"{theirs[name]} {tuple(t.shape)} (arguments: {expected[name]})"
                 for name, t in converted.items() if tuple(t.shape) != expected[name]]  # fmt: skip
    if misshapen:
        raise ValueError(
            f"{src}: the weights disagree with the sizes in the checkpoint's arguments (state_size, "
            f"transformer.n_heads, transformer.head_projection_size, moe.n_experts, moe.expert_size, "
            f"moe.att.n_experts): {listed(misshapen)}."
        )
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------------- tokenizer

PROBES = [
    "Hello world. The quick brown fox jumps over the lazy dog!",
    "  leading,   repeated   and trailing spaces  ",
    "digits 1234567890 and 3.14159, 2024-05-26",
    "tabs\tand\nnewlines\n\nand CRLF\r\n",
    "ünïcödé Ñ ﬁ ＡＢＣ ① ½ 中文 😀 ─",
    "<s> </s> <unk> are text here",
    "",
]


def convert_tokenizer(spm_model: str | Path, vocab_size: int | None = None):
    """A Hugging Face tokenizer for the training run's SentencePiece model (checked on PROBES against SentencePiece
    itself); `vocab_size`, if given, must be the model's vocabulary size."""
    spm_model = Path(spm_model)
    if not spm_model.is_file():
        raise ValueError(f"--tokenizer {spm_model} is not a file; give the run's SentencePiece .model file.")
    try:
        import google.protobuf  # noqa: F401
        import sentencepiece
    except ImportError:
        raise ValueError("--tokenizer needs the sentencepiece and protobuf packages "
                         "(pip install sentencepiece protobuf).") from None  # fmt: skip
    from transformers import TokenizersBackend

    reference = sentencepiece.SentencePieceProcessor()
    try:
        reference.Load(str(spm_model))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"--tokenizer {spm_model} is not a SentencePiece model: {error}") from None
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(spm_model, Path(folder) / "tokenizer.model")
        # split_special_tokens: "<s>" in text is text, as for SentencePiece (the training data has no BOS/EOS)
        tokenizer = TokenizersBackend.from_pretrained(folder, split_special_tokens=True)
    if len(tokenizer) != reference.GetPieceSize():
        raise ValueError(f"the converted tokenizer has {len(tokenizer)} tokens, SentencePiece "
                         f"{reference.GetPieceSize()}; not written.")  # fmt: skip
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise ValueError(f"--tokenizer {spm_model} has {len(tokenizer)} pieces but the model's vocabulary is "
                         f"{vocab_size}: not this run's tokenizer.")  # fmt: skip
    for text in PROBES:
        ours, theirs = tokenizer.encode(text), reference.EncodeAsIds(text)
        if ours != theirs:
            raise ValueError(f"the converted tokenizer encodes {text!r} as {ours[:12]}, SentencePiece as "
                             f"{theirs[:12]}; not written.")  # fmt: skip
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m conversion.official_moeut_to_moeut",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="training-code checkpoint file (e.g. checkpoints/C4_44M.ckpt)")
    add_output_arguments(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cast weights (default: keep)")
    parser.add_argument("--tokenizer", help="the run's SentencePiece model, saved as a Hugging Face tokenizer too")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    for option, path in (("--src", args.src), ("--tokenizer", args.tokenizer)):
        if path is not None and out in Path(path).resolve().parents:
            parser.error(f"--out {args.out} contains {option} {path}, which replacing it would delete.")
    tokenizer = []

    def build():
        model = convert(args.src, getattr(torch, args.dtype) if args.dtype else None)
        if args.tokenizer:
            tokenizer.append(convert_tokenizer(args.tokenizer, model.config.vocab_size))
        return model

    def add_tokenizer(folder: Path) -> None:
        if tokenizer:
            tokenizer[0].save_pretrained(folder)

    convert_and_save(parser, args, build, tokenizer_source=None, add_files=add_tokenizer)
    print(f"saved {args.out}" + (" (with tokenizer)" if tokenizer else ""))


if __name__ == "__main__":
    main()
