"""Writing a converted checkpoint all or nothing, for every converter of this package.

A conversion can take minutes and fail late (a full disk, a missing tokenizer file, an interrupt). The model and
the tokenizer files go to a new directory beside `--out`, renamed to `--out` once complete, so that a failure leaves
neither a partial checkpoint nor a damaged earlier one. A non-empty `--out` is replaced only when asked to.
"""

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from modeling_mom.workflows.common import check_can_be_directory, move_into_place, sibling_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def listed(names: list[str]) -> str:
    """The first few of `names` for an error message, with the count when there are more."""
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--out` and `--overwrite` options every converter's command line takes."""
    parser.add_argument("--out", required=True, help="output directory (must be absent or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """`out` as a Path, after checking it may be written: absent, an empty directory, or `overwrite`; never the
    working directory, nor the `source` checkpoint directory (or one that contains it), which replacing would delete."""
    out = Path(out)
    check_can_be_directory(out, f"--out {out}")
    check_can_be_directory(out.parent, f"--out {out}")  # where it is staged, then renamed into place
    cwd = Path.cwd()
    if out.resolve() in (cwd, *cwd.parents):  # it is renamed into place, which the working directory cannot be
        raise ValueError(f"--out {out} is the working directory or contains it; name a new directory instead.")
    if source is not None and Path(source).is_dir():
        source_dir = Path(source).resolve()
        if out.resolve() in (source_dir, *source_dir.parents):
            raise ValueError(f"--out {out} is the source checkpoint {source} or contains it; name another directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it.")
    return out


def check_tokenizer_files(source: str | os.PathLike | None) -> None:
    """A ValueError if the local checkpoint directory `source` has tokenizer files that do not load (they were copied
    as they were, and the converted checkpoint then failed in every training command); none at all is fine."""
    if source is None or not Path(source).is_dir():
        return
    if not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return
    try:
        AutoConfig.from_pretrained(source)  # which the tokenizer's loading reads too
    except Exception:  # the converter's own checks of the source name the problem
        return
    try:
        AutoTokenizer.from_pretrained(source)
    except Exception as error:  # a damaged JSON file, or one `tokenizers` cannot read, raises anything
        raise ValueError(
            f"the tokenizer files in {source} do not load ({type(error).__name__}: {error}); repair or remove them."
        ) from error


def copy_tokenizer(source: str | os.PathLike, target: Path) -> list[str]:
    """Copy the tokenizer files of a checkpoint directory or hub repo into `target`; returns the names copied."""
    if Path(source).is_dir():
        folder = Path(source)
    else:
        folder = Path(snapshot_download(str(source), allow_patterns=list(TOKENIZER_FILES)))
    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in copied:
        shutil.copyfile(folder / name, target / name)
    return copied


def save_converted(
    model: PreTrainedModel,
    out: str | os.PathLike,
    tokenizer_source: str | os.PathLike | None = None,
    overwrite: bool = False,
    add_files: Callable[[Path], None] | None = None,
) -> list[str]:
    """Write `model` (and the tokenizer files of `tokenizer_source`, if any) to `out`, atomically.

    Everything goes to a temporary directory in `out`'s parent, renamed to `out` once complete; on any error the
    temporary directory is removed and an existing `out` is left as it was. `add_files(directory)`, if given, writes
    more files into the checkpoint before the rename (`mom convert` adds its tokenizer and history record). Returns
    the tokenizer files copied.
    """
    out = check_output_dir(out, overwrite, tokenizer_source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling_dir(out, "partial")
    try:
        model.save_pretrained(staging)
        copied = copy_tokenizer(tokenizer_source, staging) if tokenizer_source is not None else []
        if add_files is not None:
            add_files(staging)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return copied


def convert_and_save(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    build: Callable[[], PreTrainedModel],
    tokenizer_source: str | os.PathLike | None,
    add_files: Callable[[Path], None] | None = None,
) -> tuple[PreTrainedModel, list[str]]:
    """A converter command line's work: check `--out` and the tokenizer files first (before a long conversion), build
    the model, save it all or nothing (with `add_files`, see :func:`save_converted`). A ValueError (bad options, a
    source that does not fit) becomes the parser's usage error. Returns the model and the tokenizer files copied."""
    try:
        check_output_dir(args.out, args.overwrite, tokenizer_source)
        check_tokenizer_files(tokenizer_source)
        model = build()
        return model, save_converted(model, args.out, tokenizer_source, args.overwrite, add_files)
    except ValueError as error:
        parser.error(str(error))
