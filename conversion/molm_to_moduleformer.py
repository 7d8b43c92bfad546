"""Convert an official ModuleFormer / MoLM checkpoint (IBM's layout, e.g. `ibm/MoLM-350M-4B`) to this package.

    python -m conversion.molm_to_moduleformer --src MOLM_DIR --out DIR [--overwrite] [--dtype float32]

The official `config.json` loads unchanged (`ModuleFormerConfig` aliases its keys). Weights are renamed one to one,
with no transposes (both layouts store experts as `[E, in, out]`); the `attn.mask` / `attn.cum_weight` buffers of the
official checkpoints are dropped. Reads `model.safetensors`, `pytorch_model.bin` or their sharded variants.
The converted weights and MOLM_DIR's tokenizer files are written all or nothing (`checkpoint_writer.py`).
"""

import argparse
import functools
import json
import pickle
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file

from modeling_mom import ModuleFormerConfig, ModuleFormerForCausalLM

from .checkpoint_writer import add_output_arguments, convert_and_save, listed

# official name (regex) -> ours; `None` drops the tensor
KEY_MAP = [
    (r"transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"transformer\.ln_f\.(weight|bias)", r"model.norm.\1"),
    (r"transformer\.h\.(\d+)\.ln_1\.(weight|bias)", r"model.layers.\1.input_layernorm.\2"),
    (r"transformer\.h\.(\d+)\.ln_2\.(weight|bias)", r"model.layers.\1.post_attention_layernorm.\2"),
    (r"transformer\.h\.(\d+)\.attn\.(k_proj|v_proj)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
    (r"transformer\.h\.(\d+)\.attn\.(mask|cum_weight)", None),
    (r"transformer\.h\.(\d+)\.attn\.q_proj\.(.+)", r"model.layers.\1.self_attn.\2"),
    (r"transformer\.h\.(\d+)\.mlpf\.(.+)", r"model.layers.\1.mlp.\2"),
    (r"lm_head\.weight", "lm_head.weight"),
]
# inside one MoE (`q_proj` or `mlpf`)
MOE_MAP = [
    (r"(.+)\.experts\.weight", r"\1.input_proj"),
    (r"(.+)\.experts\.bias", r"\1.input_bias"),
    (r"(.+)\.output_experts\.weight", r"\1.output_proj"),
    (r"(.+)\.output_experts\.bias", r"\1.output_bias"),
]
# the router (`top_k_gating.w_gate`, an nn.Sequential either way) by `gate_type` (our `router_type`)
GATE_MAP = {
    "mlp": [  # Linear(d, hidden) - GELU - Dropout - Linear(hidden, E, bias=False)
        (r"(.+)\.gate\.w_gate\.0\.(weight|bias)", r"\1.router.fc.\2"),
        (r"(.+)\.gate\.w_gate\.3\.weight", r"\1.router.out.weight"),
    ],
    "linear": [(r"(.+)\.gate\.w_gate\.0\.weight", r"\1.router.out.weight")],  # Linear(d, E, bias=False)
}


def rename(key: str, router_type: str = "mlp") -> str | None:
    """Our name of an official tensor of a model with routers of `router_type` (official `gate_type`), or None for
    the buffers that are not weights."""
    for pattern, target in KEY_MAP:
        if re.fullmatch(pattern, key):
            if target is None:
                return None
            name = re.sub(pattern, target, key)
            for moe_pattern, moe_target in MOE_MAP + GATE_MAP[router_type]:
                if re.fullmatch(moe_pattern, name):
                    return re.sub(moe_pattern, moe_target, name)
            return name
    raise ValueError(f"unexpected tensor {key!r} in the official checkpoint; not part of the ModuleFormer layout.")


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files: those its shard index names (all must exist), else the single files found."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no \"weight_map\" of tensor names to shard files.")
            names = sorted(set(weight_map.values()))
            absent = [name for name in names if not (src / name).is_file()]
            if absent:
                raise ValueError(f"{src} lacks the shard(s) {absent} that {index_name} lists.")
            return [src / name for name in names]
    files = sorted(src.glob("model*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{src} has no model*.safetensors or pytorch_model*.bin weights.")
    return files


def load_official_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of an official checkpoint directory (single file or shards, safetensors or pickle)."""
    state = {}
    for file in _weight_files(src):
        try:
            if file.suffix == ".safetensors":
                state.update(load_file(file))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(f"{file} could not be read as checkpoint weights (truncated or not a weights file?): "
                             f"{error}") from error
    return state


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; a ValueError naming the file if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object.")
    return value


def convert(src: str | Path, dtype: torch.dtype | None = None) -> ModuleFormerForCausalLM:
    """Load the official checkpoint in `src` as a `ModuleFormerForCausalLM`.

    `dtype` casts the weights (default: keep the checkpoint's, bf16 for MoLM). A ValueError names what does not fit:
    no config.json, missing weight files or shards, tensors missing, unexpected or shaped unlike the config says.
    """
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; --src must be a local copy of an official MoLM checkpoint.")
    official = _read_json(src / "config.json")
    for key in ("architectures", "auto_map", "model_type"):
        official.pop(key, None)
    try:
        config = ModuleFormerConfig(**official)
    except (TypeError, StrictDataclassError) as error:  # a field of the wrong type (ValueErrors name themselves)
        raise ValueError(f"{src / 'config.json'} is not a valid MoLM config: {error}") from error
    state = {}
    for key, tensor in load_official_state_dict(src).items():
        name = rename(key, config.router_type)
        if name is not None:
            state[name] = tensor if dtype is None else tensor.to(dtype)
    with torch.device("meta"):
        model = ModuleFormerForCausalLM(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match its config: missing [{listed(missing)}], unexpected [{listed(unexpected)}]."
        )
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    misshapen = [f"{name} {shape} (config: {expected[name]})"
                 for name, shape in shapes.items() if shape != expected[name]]
    if misshapen:
        raise ValueError(
            f"the weights disagree with config.json's sizes (n_att_experts, n_mlp_experts, att_hidden, ffd_hidden, "
            f"n_embd, vocab_size): {listed(misshapen)}."
        )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:  # the head was built on the meta device: point it at the loaded embeddings
        model.tie_weights()
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m conversion.molm_to_moduleformer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="official MoLM checkpoint directory (config.json + weights)")
    add_output_arguments(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cast weights (default: keep)")
    args = parser.parse_args(argv)
    build = functools.partial(convert, args.src, getattr(torch, args.dtype) if args.dtype else None)
    convert_and_save(parser, args, build, tokenizer_source=args.src)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
