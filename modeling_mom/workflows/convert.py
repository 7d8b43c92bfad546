"""`mom convert ARCH --gpt2 SRC --out DIR [options]`: the GPT-2 converters of `conversion/` behind one command.

Every module `conversion/gpt2_to_<arch>.py` is a converter: `convert(gpt2, **options) -> model` and a command line
`main(argv, add_files)` taking `--gpt2`, `--out` and `--overwrite`. A converter that accepts `exact=True` offers a
function-preserving form (the converted model computes GPT-2's function). `mom convert` runs the converter's own
command line, which also saves GPT-2's tokenizer (with EOS as the pad token if it has none, GPT-2's usual choice)
and a history record next to the model, so that the directory is ready for `mom pretrain`, `mom glue` and
`mom summarize`. All of it is written to a new directory beside `--out` and renamed to `--out` once complete: an
interrupted or failed conversion leaves no partial checkpoint, and an existing non-empty `--out` is replaced only
with `--overwrite`.
"""

import argparse
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

from .common import HISTORY_FILE, WorkflowError, load_model_config, saved_tokenizer, write_json

CONVERTER_PREFIX = "gpt2_to_"


def converters() -> dict[str, ModuleType]:
    """Architecture name -> its GPT-2 converter module, for every `conversion/gpt2_to_<arch>.py`."""
    try:
        import conversion
    except ImportError:
        return {}
    names = sorted(m.name for m in pkgutil.iter_modules(conversion.__path__) if m.name.startswith(CONVERTER_PREFIX))
    return {name[len(CONVERTER_PREFIX) :]: importlib.import_module(f"conversion.{name}") for name in names}


def offers_exact(converter: ModuleType) -> bool:
    """Whether the converter has a function-preserving form (`convert(..., exact=True)`)."""
    return "exact" in inspect.signature(converter.convert).parameters


def gpt2_tokenizer(source: str):
    """The tokenizer saved with a GPT-2 checkpoint, with EOS as its pad token if it has none; None if absent."""
    try:
        tokenizer = saved_tokenizer(source)
    except WorkflowError:
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main(argv=None) -> None:
    available = converters()
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="mom convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("--gpt2")
    parser.add_argument("--out")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"architectures: {', '.join(available) or '(no converter installed)'}")
        return
    arch, converter_argv = argv[0], argv[1:]
    if arch not in available:
        first = "an option" if arch.startswith("-") else "unknown"
        raise WorkflowError(f"the architecture comes first (mom convert ARCH --gpt2 SRC --out DIR [options]); "
                            f"{arch!r} is {first}; allowed: {', '.join(available)}.")
    args, _ = parser.parse_known_args(converter_argv)
    if args.out is None or {"-h", "--help"} & set(converter_argv):
        available[arch].main(converter_argv, prog=f"mom convert {arch}")  # its own usage or error
        return
    if args.gpt2 is not None:
        load_model_config(args.gpt2, "--gpt2")  # a missing or config-less source fails here, before converting
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise WorkflowError(f"--out {out} exists and is not a directory; name a directory (absent or empty).")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise WorkflowError(f"--out {out} exists and is not an empty directory; pass --overwrite to replace it.")
    options = [arg for arg in converter_argv if arg != "--overwrite"]  # what made the model, for its history

    def add_files(checkpoint: Path) -> None:
        _add_tokenizer_and_history(checkpoint, out, args.gpt2, arch, options)

    available[arch].main(converter_argv, add_files=add_files, prog=f"mom convert {arch}")


def _add_tokenizer_and_history(checkpoint: Path, out: Path, gpt2: str, arch: str, options: list[str]) -> None:
    """GPT-2's tokenizer and the history record, into `checkpoint` (the staging directory that becomes `out`)."""
    tokenizer = gpt2_tokenizer(gpt2)
    if tokenizer is None:
        print(f"note: no tokenizer at {gpt2}; pass --tokenizer to the training commands or save one in {out}")
    else:
        tokenizer.save_pretrained(checkpoint)
    source = str(Path(gpt2).resolve()) if Path(gpt2).exists() else gpt2  # a local path, not a Hub id, from any cwd
    write_json(checkpoint / HISTORY_FILE, [{"command": "convert", "arch": arch, "source": source, "options": options}])
