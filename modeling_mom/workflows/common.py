"""Input checks and loading shared by the `mom` commands: models, tokenizers, data files, context lengths.

Every check here runs before any training and raises `WorkflowError` with one message that names the bad value and
what is allowed; the `mom` command prints it and exits with status 2.
"""

import csv
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

LOCAL_DATA_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv"}


SEED_RANGE = range(2**32)  # the seeds numpy takes (the Trainer's `set_seed` seeds it), for every command


class WorkflowError(ValueError):
    """Bad input to a `mom` command, found before any work was done."""


def check_positive(args, *names: str) -> None:
    """Each named option, when given, must be >= 1: a count, size or number of steps (0 would leave nothing to do,
    or be read as "unset" and replaced by the default)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise WorkflowError(f"--{name.replace('_', '-')} {value} must be >= 1.")


def check_can_be_directory(directory: str | Path, option: str) -> None:
    """`directory` is one, or can be made: the nearest existing path of it and its parents must be a directory, and
    writable (an empty directory is made and removed there to find out). A file there failed only when the first file
    was written, after the model had loaded (FileExistsError, NotADirectoryError). `option` names the argument in the
    message, e.g. "--out runs/x"."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise WorkflowError(
            f"{option}: {existing} exists and is not a directory; name a directory (an existing one or a new one)."
        )
    if existing is not None:  # a read-only location failed only at the first write, after the work
        try:
            tempfile.TemporaryDirectory(dir=existing, prefix=".mom-write-probe-").cleanup()
        except OSError as error:
            raise WorkflowError(f"{option}: cannot write in {existing} ({error.strerror}); name a writable location.")


def load_model_config(model: str, option: str = "--model") -> PreTrainedConfig:
    """The config of `model` (a checkpoint directory or a Hub id, given as `option`); checks that it is one, with a
    valid config (a wrong-typed field raises huggingface_hub's `StrictDataclassError`, which is no ValueError)."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise WorkflowError(f"{option} {model} is a file; expected a checkpoint directory or a Hub model id.")
        if not (path / "config.json").is_file():
            raise WorkflowError(
                f"{option} {model} has no config.json, so it is not a saved model; expected a directory written by "
                "`save_pretrained`, `mom convert` or a `mom` training command (e.g. runs/demo/mom/pretrain/final)."
            )
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError, TypeError, StrictDataclassError) as error:
        reason = " ".join(str(error).split())  # on one line
        if path.exists():
            raise WorkflowError(f"{option} {model}: {path / 'config.json'} is invalid ({reason}).") from error
        raise WorkflowError(
            f"{option} {model}: no such directory, and it cannot be loaded as a Hub model id either ({reason})."
        ) from error


def is_classifier(config: PreTrainedConfig) -> bool:
    """Whether the checkpoint of `config` was saved as a sequence classifier."""
    return any(name.endswith("ForSequenceClassification") for name in config.architectures or [])


def check_language_model(model: str, config: PreTrainedConfig, tokenizer) -> None:
    """`model` must be a causal language model whose vocabulary holds every id of `tokenizer`: a classifier's
    language-model head would start random, and a larger tokenizer fails deep inside the model (an IndexError)."""
    if is_classifier(config):
        raise WorkflowError(
            f"--model {model} is a sequence classifier ({', '.join(config.architectures)}); this command needs a "
            "language model: give the checkpoint it was fine-tuned from (e.g. a pretrain or convert output)."
        )
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise WorkflowError(f"--model {model} is a {config.model_type!r} model, which has no causal-LM form.")
    if len(tokenizer) > config.vocab_size:
        raise WorkflowError(
            f"the tokenizer has {len(tokenizer)} tokens but --model {model} has a vocabulary of {config.vocab_size}; "
            "give the tokenizer the model was trained with (--tokenizer)."
        )


def saved_tokenizer(source: str):
    """`AutoTokenizer.from_pretrained(source)`; a WorkflowError where `source` holds no tokenizer. From a model
    directory without tokenizer files transformers builds an empty tokenizer (its vocabulary is its special tokens
    alone, so every text encodes to nothing); that counts as none."""
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise WorkflowError(f"no tokenizer found at {source} ({error}).") from error
    if len(tok.get_vocab()) <= len(tok.all_special_tokens):
        raise WorkflowError(f"no tokenizer found at {source} (no tokenizer files: an empty vocabulary).")
    return tok


def load_tokenizer(model: str, tokenizer: str | None = None, needs_padding: bool = False, pad_token: str | None = None):
    """The tokenizer saved with `model` (or at `tokenizer`); with `needs_padding`, one that has a pad token and pads
    on the right.

    The batches it pads are for training, scoring and routing statistics, where left padding would shift the
    positions of a model that does not derive them from the attention mask (GPT-2); generation pads on the left
    explicitly. `pad_token` (e.g. GPT-2's `<|endoftext|>`) sets the pad token to a token already in the vocabulary.
    """
    source = tokenizer or model
    try:
        tok = saved_tokenizer(source)
    except WorkflowError as error:
        raise WorkflowError(f"{error} Save one next to the model or pass --tokenizer.") from error
    if pad_token is not None:
        if tok.convert_tokens_to_ids(pad_token) in (None, tok.unk_token_id):
            raise WorkflowError(f"--pad-token {pad_token!r} is not in the vocabulary of the tokenizer at {source}.")
        tok.pad_token = pad_token
    if needs_padding and tok.pad_token is None:
        raise WorkflowError(
            f"the tokenizer at {source} has no pad token, which batching sequences of different lengths needs; "
            f"pass --pad-token (for GPT-2 tokenizers the usual choice is its EOS, --pad-token "
            f"{tok.eos_token or '<|endoftext|>'!r}) or save the tokenizer with one."
        )
    if needs_padding:
        tok.padding_side = "right"
    return tok


def check_context_length(length: int, config: PreTrainedConfig, option: str) -> None:
    """`length` tokens must fit the model's positions (`max_position_embeddings`, when the config has one)."""
    if length < 2:
        raise WorkflowError(f"{option} {length} is too short; allowed: 2..{model_context_length(config) or 'any'}.")
    limit = model_context_length(config)
    if limit is not None and length > limit:
        raise WorkflowError(
            f"{option} {length} is longer than the model allows (max_position_embeddings={limit}); "
            f"allowed: 2..{limit}."
        )


def model_context_length(config: PreTrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def is_local_data(name: str) -> bool:
    """A data argument names a local file if it has a data file extension or exists on disk."""
    return Path(name).suffix.lower() in LOCAL_DATA_BUILDERS or os.path.exists(name)


def load_local_split(path: str, columns: list[str]):
    """One local data file (.txt, .json, .jsonl, .csv, .tsv) as a `datasets.Dataset`, checked to hold `columns`."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    file = Path(path)
    builder = LOCAL_DATA_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise WorkflowError(
            f"data file {path}: unknown extension {file.suffix!r}; allowed: {', '.join(LOCAL_DATA_BUILDERS)}."
        )
    if not file.is_file():
        raise WorkflowError(f"data file {path} does not exist.")
    if file.stat().st_size == 0:  # `datasets` raised a bare StopIteration on an empty JSON file
        raise WorkflowError(f"data file {path} is empty; it needs rows with the column(s) {columns}.")
    # a TSV cell is its text verbatim (GLUE's files hold unmatched quotes): CSV quoting would merge rows
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if file.suffix.lower() == ".tsv" else {}
    try:
        data = load_dataset(builder, data_files=str(file), split="train", **options)
    except (DatasetGenerationError, ValueError, json.JSONDecodeError) as error:
        cause = error.__cause__ or error
        raise WorkflowError(f"data file {path} is not valid {builder.upper()}: {cause}") from error
    check_columns(data, columns, f"data file {path}")
    if len(data) == 0:
        raise WorkflowError(f"data file {path} has no rows.")
    return data


def check_columns(data, columns: list[str], where: str) -> None:
    names = data.column_names
    if names is None:  # a streamed data set whose features are only known once read
        return
    missing = [c for c in columns if c not in names]
    if missing:
        raise WorkflowError(f"{where} lacks the column(s) {missing}; it has {names}.")


def text_cells(batch: dict, column: str) -> list[str]:
    """The `column` of a batch of rows (in a `datasets.map` function), each cell checked to be text: a null cell (an
    empty CSV field, a JSON null) would otherwise fail inside the tokenizer with a traceback that names neither."""
    for value in batch[column]:
        if not isinstance(value, str):
            raise WorkflowError(
                f"column {column!r} holds {value!r} where text is expected; every row needs text there (drop or fill "
                "the empty cells)."
            )
    return batch[column]


def write_json(path: str | Path, value) -> None:
    """Write JSON through a temporary file and a rename, so that a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float) + "\n")
    os.replace(tmp, path)


HISTORY_FILE = "mom_history.json"


def read_history(model: str) -> list[dict]:
    """How a checkpoint was made: one record per `mom` step (convert, pretrain, glue, summarize), oldest first."""
    path = Path(model) / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def sibling_dir(out: Path, kind: str) -> Path:
    """A new hidden directory next to `out` (same filesystem, so renames are atomic; created with the umask's mode)."""
    path = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.{kind}"
    path.mkdir()
    return path


def move_into_place(staging: Path, out: Path):
    """Rename `staging` to `out`; an existing `out` is moved aside first and deleted only after the rename."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = sibling_dir(out, "old")
    try:
        os.replace(out, old / out.name)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(old / out.name, out)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
