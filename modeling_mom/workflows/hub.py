"""`mom push DIR REPO_ID`: publish a checkpoint on the Hugging Face Hub with its model card.

    mom push runs/mom-sst2/final my-name/mom-gpt2-sst2 [--private]

Uploads, in one commit: the weights (safetensors), the modeling code (so that the repository loads with
`trust_remote_code=True` without this package), the tokenizer, the training history, and a README.md model card
rendered from `model_cards/<model_type>.md` with `ModelCardData` metadata and the evaluation results of the
checkpoint's last step as `model-index`. The training commands' `--push-to-hub REPO_ID` does the same at the end.
"""

import argparse
import contextlib
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import (
    CommitOperationAdd,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedConfig,
)

from model_cards import template_path, templates

from .common import (
    HISTORY_FILE,
    WorkflowError,
    is_classifier,
    is_local_data,
    load_model_config,
    read_history,
)

TAGS = ["custom_code", "moe", "mixture-of-experts", "modular"]


def check_push_target(repo_id: str, config: PreTrainedConfig, license: str | None = None) -> None:
    """Fail before any work if `repo_id` or `license` is malformed or the architecture has no model card template."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise WorkflowError(f"{repo_id!r} is not a valid Hub repository id: {error}") from error
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise WorkflowError(f"--license {license!r} is not a Hub license id; use the Hub's lowercase identifier, "
                            "e.g. mit, apache-2.0, cc-by-4.0 or other.")
    if not template_path(config.model_type).is_file():
        raise WorkflowError(
            f"no model card template for model type {config.model_type!r}; allowed: {', '.join(templates())}."
        )


def hub_id(name: str | None) -> str | None:
    """`name` if it is a Hub id (not a local path), else None: only Hub ids belong in card metadata."""
    if not name or is_local_data(name) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def eval_results(record: dict) -> list[EvalResult]:
    """The `model-index` entries of one history record (the checkpoint's last step)."""
    dataset = hub_id(record.get("dataset")) or "local"
    name = dataset if dataset != "local" else f"local file {Path(record.get('dataset', '')).name}"
    validation = record.get("validation_file")  # scores measured on a local file, not on the training data
    if validation:
        dataset, name = "local", f"local file {Path(validation).name}"
    results = record.get("results", {})
    if record["command"] == "glue":
        files = record.get("validation_files", {})  # local files scored instead of the Hub's splits
        return [
            EvalResult(task_type="text-classification", task_name="Text Classification",
                       dataset_type="local" if split in files else dataset,
                       dataset_name=f"GLUE {record['task_title']}"
                       + (f" (local file {Path(files[split]).name})" if split in files else ""),
                       dataset_config=record["task"], dataset_split=split, metric_type=metric, metric_value=value)
            for split, metrics in results.items()
            for metric, value in metrics.items()
        ]
    if record["command"] == "summarize":
        return [
            EvalResult(task_type="summarization", task_name="Summarization", dataset_type=dataset,
                       dataset_name=name, dataset_split=summarized_split(record), metric_type="rouge",
                       metric_name=rouge.upper().replace("ROUGE", "ROUGE-"), metric_value=results[rouge])
            for rouge in ("rouge1", "rouge2", "rougeL")
            if rouge in results
        ]
    if record["command"] == "pretrain" and "perplexity" in results:
        return [EvalResult(task_type="text-generation", task_name="Language Modeling", dataset_type=dataset,
                           dataset_name=name, dataset_split="validation" if validation else "held-out",
                           metric_type="perplexity", metric_value=results["perplexity"])]
    return []


def summarized_split(record: dict) -> str:
    """The validation examples a summarization run scored, in `datasets`' slicing syntax: "validation[:500]" when
    `--max-eval-samples` took the first 500."""
    scored, size = record["eval_examples"], record["validation_examples"]
    return "validation" if scored == size else f"validation[:{scored}]"


def describe_step(record: dict) -> str:
    """One markdown bullet: what a `mom` step did, with its settings and results."""
    command = record["command"]
    if command == "convert":
        return (f"- **Seeded** from `{record['source']}` with `mom convert {record['arch']} "
                f"{' '.join(record['options'])}`.")
    settings = f"{record.get('steps')} steps, peak learning rate {record.get('learning_rate')}"
    if command == "pretrain":
        text = (f"- **Continued pretraining** on `{record['dataset']}`: {settings}, {record['tokens']:,} tokens in "
                f"blocks of {record['block_size']}")
        if record.get("held_out"):
            text += f"; evaluated on {record['held_out']}"
    elif command == "glue":
        text = f"- **Fine-tuned** on GLUE {record['task_title']} (`{record['dataset']}`): {settings}"
        files = record.get("validation_files", {})
        scored = [f"{n} examples of " + (f"`{files[split]}`" if split in files else f"the {split} split")
                  for split, n in record.get("eval_examples", {}).items()]
        if scored:
            text += "; evaluated on " + ", ".join(scored)
    elif command == "summarize":
        text = (f"- **Fine-tuned for summarization** on `{record['dataset']}`: {settings}; format "
                f"`{record['prompt_format']}`, {record['loss']}; decoding {format_settings(record['decoding'])}; "
                f"evaluated on {record['eval_examples']} of the {record['validation_examples']} "
                f"examples of " + (f"`{record['validation_file']}`" if record.get("validation_file")
                                   else "the validation split"))
    else:
        text = f"- `{command}`: {settings}"
    return f"{text}. Results: {format_results(record.get('results', {}))}."


def format_settings(settings: dict) -> str:
    """`{"num_beams": 4}` -> "`num_beams=4`": keyword arguments as a reader would pass them."""
    return ", ".join(f"`{key}={value}`" for key, value in settings.items())


def format_results(results: dict) -> str:
    def value(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(
        f"{k}: {{{format_results(v)}}}" if isinstance(v, dict) else f"{k} {value(v)}" for k, v in results.items()
    ) or "none"


def results_table(results: list[EvalResult]) -> str:
    if not results:
        return "No evaluation was recorded for this checkpoint."
    rows = [f"| {r.dataset_name} | {r.dataset_split} | {r.metric_name or r.metric_type} | {r.metric_value:.4f} |"
            for r in results]
    return "\n".join(["| data set | split | metric | value |", "|---|---|---|---|", *rows])


def render_card(checkpoint: str, repo_id: str, license: str | None = None) -> ModelCard:
    """The model card of `checkpoint` as it will be published at `repo_id`, under the weights' `license` (a Hub
    license id; the weights' licence follows their seed model's, which the checkpoint cannot tell)."""
    config = load_model_config(checkpoint)
    history = read_history(checkpoint)
    last = history[-1] if history else {}
    seeds = [hub_id(r.get("source")) for r in history if r["command"] == "convert"]
    datasets = sorted({d for r in history if (d := hub_id(r.get("dataset")))})
    classifier = is_classifier(config)
    results = eval_results(last) if last else []
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=TAGS + [config.model_type],
        base_model=next((s for s in seeds if s), None),
        datasets=datasets or None,
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )
    auto_class = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path(config.model_type)),
        repo_id=repo_id,
        model_name=card_data.model_name,
        config=config.to_dict(),
        auto_class=auto_class,
        history="\n".join(describe_step(r) for r in history) or "- No training history was recorded.",
        results=results_table(results),
        summarization=last if last.get("command") == "summarize" else None,
    )


def export(checkpoint: str, folder: str) -> None:
    """Everything to upload: model re-saved through its Auto class (safetensors + code), tokenizer, history, card."""
    config = load_model_config(checkpoint)
    auto = AutoModelForSequenceClassification if is_classifier(config) else AutoModelForCausalLM
    model = auto.from_pretrained(checkpoint, dtype=torch.float32)
    model.save_pretrained(folder)
    try:
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder)
    except (OSError, ValueError):
        print(f"note: no tokenizer in {checkpoint}; uploading the model without one")
    if (Path(checkpoint) / HISTORY_FILE).is_file():
        shutil.copyfile(Path(checkpoint) / HISTORY_FILE, Path(folder) / HISTORY_FILE)


@contextlib.contextmanager
def hub_errors(repo_id: str):
    """The Hub's errors (offline mode, no connection, HTTP errors such as a missing token) as a WorkflowError."""
    try:
        yield
    except OSError as error:  # huggingface_hub's HTTP and offline errors are OSErrors
        raise WorkflowError(f"pushing to {repo_id} failed: {type(error).__name__}: {error}") from error


def push(
    checkpoint: str, repo_id: str, private: bool = False, token: str | None = None, license: str | None = None
) -> str:
    """Upload `checkpoint` to `repo_id` in one commit; returns the commit URL."""
    check_push_target(repo_id, load_model_config(checkpoint, "checkpoint"), license)
    card = render_card(checkpoint, repo_id, license)
    api = HfApi(token=token)
    with hub_errors(repo_id):  # before the export, so that an unreachable Hub costs nothing
        api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        export(checkpoint, folder)
        card.save(Path(folder) / "README.md")
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        ]
        with hub_errors(repo_id):
            commit = api.create_commit(repo_id=repo_id, operations=operations,
                                       commit_message=f"Upload {Path(checkpoint).name} with `mom push`")
    print(f"pushed {checkpoint} to {repo_id}: {commit.commit_url}")
    return commit.commit_url


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="mom push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/mom-sst2/final)")
    parser.add_argument("repo_id", help="Hub repository, e.g. my-name/mom-gpt2-sst2 (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`)")
    parser.add_argument("--license", help="the weights' licence as a Hub license id for the card's metadata, e.g. "
                        "`mit` (GPT-2's weights) or `apache-2.0` (IBM's MoLM weights); default: none stated")
    args = parser.parse_args(argv)
    return push(args.checkpoint, args.repo_id, private=args.private, token=args.token, license=args.license)
