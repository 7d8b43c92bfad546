"""`mom inspect`: how a model assembles itself, i.e. which module or expert each token used in each round or layer.

    mom inspect --model runs/demo/mom/pretrain/final --text "the cat sees the river ." --out routing.png
    mom inspect --model DIR --dataset held_out.jsonl --out routing.png       # usage table over a data set

For every router call (one per routed layer, or per round of a MoM chunk, in execution order) the token's
highest-scoring choice is recorded; for MoM the last choice of a router with SKIP enabled is SKIP. With `--text`:
a heat map (router call x token) at `--out` and a token table `<out>_tokens.csv`. With `--dataset`: the share of
tokens choosing each option, per router call, as `<out>_usage.csv` and printed as a table. Either way, the shares
(over the data set, else over the text) as a map, router call x choice, at `<out>_usage.png`. Works for any
architecture whose model records `router_logits` (`_can_record_outputs`).
"""

import argparse
import csv
import inspect
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers.utils.output_capturing import OutputRecorder

from modeling_mom.shared_modeling import CACHE_FIELD

from .common import (
    WorkflowError,
    check_can_be_directory,
    check_columns,
    check_language_model,
    check_positive,
    is_local_data,
    load_local_split,
    load_model_config,
    load_tokenizer,
    model_context_length,
    text_cells,
)


class RouterRecorder:
    """Forward hooks on a model's routers: each call's name and `[tokens, choices]` logits, in execution order."""

    def __init__(self, model):
        recorder = getattr(model, "_can_record_outputs", None) or {}
        recorder = recorder.get("router_logits")
        if recorder is None:
            raise WorkflowError(
                f"{type(model).__name__} records no router_logits (it has no routers to inspect)."
            )
        target = recorder.target_class if isinstance(recorder, OutputRecorder) else recorder
        self.index = recorder.index if isinstance(recorder, OutputRecorder) else 0
        self.routers = {module: name.removeprefix("model.") for name, module in model.named_modules()
                        if isinstance(module, target)}
        self.calls: list[tuple[str, torch.Tensor]] = []
        self._hooks = []

    def __enter__(self):
        self.calls = []
        self._hooks = [module.register_forward_hook(self._record) for module in self.routers]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()

    def _record(self, module, inputs, output):
        logits = output[self.index] if isinstance(output, (tuple, list)) else output
        self.calls.append((self.routers[module], logits.detach().float()))

    def choices(self, num_tokens: int) -> tuple[list[str], list[torch.Tensor], list[int]]:
        """Call labels, each call's top-1 choice per token `[num_tokens]`, and each call's number of choices.

        A router run more than once (MoM's rounds) is labelled "name, round r"; a router scoring several groups
        per token (`[tokens, groups, choices]` logits, e.g. one per attention head) counts as one call per group,
        labelled "name [group g]".
        """
        per_router = Counter(name for name, _ in self.calls)
        seen = Counter()
        labels, choices, sizes = [], [], []
        for name, logits in self.calls:
            seen[name] += 1
            label = f"{name}, round {seen[name]}" if per_router[name] > 1 else name
            size = logits.shape[-1]
            groups = logits.numel() // (size * num_tokens)
            if groups * size * num_tokens != logits.numel():
                raise WorkflowError(f"router {name} scored {logits.numel() // size} rows for {num_tokens} tokens.")
            chosen = logits.reshape(num_tokens, groups, size).argmax(-1)
            for group in range(groups):
                labels.append(f"{label} [group {group}]" if groups > 1 else label)
                choices.append(chosen[:, group])
                sizes.append(size)
        return labels, choices, sizes


def text_ids(tokenizer, text: str, config) -> torch.Tensor:
    """`text` as input ids `[1, T]`, checked to be routable: not empty, and within the model's positions (a longer
    text failed inside the position embedding with an IndexError)."""
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise WorkflowError("--text is empty after tokenisation.")
    limit = model_context_length(config)
    if limit is not None and input_ids.shape[1] > limit:
        raise WorkflowError(f"--text has {input_ids.shape[1]} tokens; the model allows at most {limit}.")
    return input_ids


def route_text(model, tokenizer, text: str) -> tuple[list[str], list[str], torch.Tensor, list[int]]:
    """(tokens, call labels, top-1 choices `[calls, tokens]`, choices per call) for one text."""
    input_ids = text_ids(tokenizer, text, model.config).to(model.device)
    with torch.no_grad(), RouterRecorder(model) as recorder:
        model(input_ids)
    labels, choices, sizes = recorder.choices(input_ids.shape[1])
    tokens = [tokenizer.decode([t]) for t in input_ids[0].tolist()]
    return tokens, labels, torch.stack(choices) if choices else torch.empty(0, len(tokens)), sizes


def usage_over_texts(
    model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 8
) -> tuple[list[str], list[Counter], list[int]]:
    """(call labels, top-1 choice counts per call over the real tokens of all texts, choices per call); each text cut
    to `max_length` tokens. A batch of texts without tokens (empty strings) is skipped: no router sees it."""
    counts, labels, sizes = None, None, None
    for start in tqdm(range(0, len(texts), batch_size), desc="routing texts", unit="batch"):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length)  # fmt: skip
        batch = batch.to(model.device)
        real = batch["attention_mask"].reshape(-1).bool()
        if not real.any():
            continue
        with torch.no_grad(), RouterRecorder(model) as recorder:
            model(**batch)
        labels, choices, sizes = recorder.choices(real.shape[0])
        counts = counts or [Counter() for _ in labels]
        for counter, chosen in zip(counts, choices):
            counter.update(chosen[real].tolist())
    if counts is None:
        raise WorkflowError(f"none of the {len(texts)} texts of --dataset has a token to route.")
    return labels, counts, sizes


def plot_heatmap(tokens: list[str], labels: list[str], choices: torch.Tensor, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    most = max(sizes)
    palette = "tab10" if most <= 10 else "tab20" if most <= 20 else None
    cmap = ListedColormap(plt.get_cmap(palette).colors[:most]) if palette else "viridis"  # one colour per choice
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tokens) + 3), max(3, 0.32 * len(labels) + 1.5)))
    image = ax.imshow(choices.numpy(), cmap=cmap, vmin=-0.5, vmax=most - 0.5, aspect="auto", interpolation="nearest")
    if len(tokens) <= 48 and len(labels) <= 64:
        for row in range(choices.shape[0]):
            for col in range(choices.shape[1]):
                ax.text(col, row, int(choices[row, col]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("token")
    ax.set_title("highest-scoring module / expert per token and router call")
    fig.colorbar(image, ax=ax, label="choice", ticks=range(most) if most <= 20 else None)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the canvas grows to fit the labels (tight_layout cut them)
    plt.close(fig)


def plot_usage(labels: list[str], counts: list[Counter], sizes: list[int], path: Path) -> None:
    """One map, router call x choice, coloured by the share of tokens choosing it (blank past a call's choices).
    One picture scales to a MoEUT's hundred router calls, where a bar chart per call took ~10 s to lay out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(sizes)
    shares = np.full((len(labels), width), np.nan)
    for row, (counter, size) in enumerate(zip(counts, sizes)):
        total = max(sum(counter.values()), 1)
        shares[row, :size] = [counter.get(c, 0) / total for c in range(size)]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * width + 3), max(3, 0.16 * len(labels) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(shares), vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if width <= 64:
        ax.set_xticks(range(width))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("choice (module / expert)")
    ax.set_title("share of tokens choosing each module / expert, per router call")
    fig.colorbar(image, ax=ax, label="share of tokens", fraction=0.08)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def usage_rows(labels: list[str], counts: list[Counter], sizes: list[int]) -> list[list]:
    """Table rows: router call, then the share of tokens choosing each option (blank past its choices)."""
    width = max(sizes)
    rows = [["router call", *[f"choice {c}" for c in range(width)]]]
    for label, counter, size in zip(labels, counts, sizes):
        total = max(sum(counter.values()), 1)
        rows.append([label, *[f"{counter.get(c, 0) / total:.3f}" if c < size else "" for c in range(width)]])
    return rows


def write_csv(rows: list[list], path: Path) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def markdown(rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])


def check_picture_path(out: Path) -> None:
    """--out names a .png file that can be written, as can the files beside it: none is a directory, and their
    directory is or can be made."""
    if out.suffix.lower() != ".png" or out.is_dir():
        found = "; it is a directory" if out.is_dir() else ""
        raise WorkflowError(f"--out {out} must name a .png file (the heat map; tables are written beside it){found}.")
    beside = [str(path) for path in output_paths(out).values() if path.is_dir()]
    if beside:
        raise WorkflowError(f"--out {out}: {', '.join(beside)}, written beside it, is a directory; choose another "
                            "--out.")
    check_can_be_directory(out.parent, f"--out {out}")


def output_paths(out: Path) -> dict[str, Path]:
    """Every file `inspect` may write for `--out`: the heat map, and beside it the tables and the usage map."""
    return {"heatmap": out, "tokens": out.with_name(out.stem + "_tokens.csv"),
            "table": out.with_name(out.stem + "_usage.csv"), "usage": out.with_name(out.stem + "_usage.png")}


def inspect_model(model, tokenizer, out: str, text: str | None = None, texts: list[str] | None = None,
                  max_length: int | None = None) -> dict:
    """Route `text` and/or `texts` (each cut to `max_length` tokens, by default the model's positions), then write
    their pictures and tables, so that a failure writes nothing; returns the paths written, and for `texts` the usage
    table as Markdown."""
    paths = output_paths(Path(out))
    check_picture_path(paths["heatmap"])
    model.eval()
    routed = route_text(model, tokenizer, text) if text is not None else None
    if routed is not None and not routed[1]:
        raise WorkflowError("no router ran for this text (e.g. a model converted with fixed routing).")
    if texts is not None:
        max_length = max_length or model_context_length(model.config)
        labels, counts, sizes = usage_over_texts(model, tokenizer, texts, max_length)
        if not labels:
            raise WorkflowError("no router ran on these texts (e.g. a model converted with fixed routing).")
    else:
        _, labels, choices, sizes = routed
        counts = [Counter(row.tolist()) for row in choices]
    paths["heatmap"].parent.mkdir(parents=True, exist_ok=True)
    written = {}
    if routed is not None:
        tokens, text_labels, choices, text_sizes = routed
        plot_heatmap(tokens, text_labels, choices, text_sizes, paths["heatmap"])
        write_csv([["token", *text_labels], *[[t, *choices[:, i].tolist()] for i, t in enumerate(tokens)]],
                  paths["tokens"])  # fmt: skip
        written.update(heatmap=str(paths["heatmap"]), tokens=str(paths["tokens"]))
    if texts is not None:
        rows = usage_rows(labels, counts, sizes)
        write_csv(rows, paths["table"])
        written.update(table=str(paths["table"]), markdown=markdown(rows))
    plot_usage(labels, counts, sizes, paths["usage"])
    written["usage"] = str(paths["usage"])
    return written


def active_parameters(model, input_ids: torch.Tensor, num_tokens: int = 8) -> float:
    """Parameters one token uses, averaged over the last `num_tokens` tokens of `input_ids` (`[1, T]`).

    A parameter counts as used by a token if it has a nonzero gradient for that token's outputs (its logits and
    router logits, through a fixed random projection), with the earlier tokens served from a detached KV cache so
    that their own modules do not count. Unchosen experts and position rows of other positions get no gradient;
    a ReLU unit that is off for the token does not count either (it does not affect that token).
    """
    model.eval()
    forward = inspect.signature(model.forward).parameters
    extra = {"output_router_logits": True} if "output_router_logits" in forward else {}
    generator = torch.Generator().manual_seed(0)
    seq = input_ids.shape[1]
    counts = []
    for position in range(max(1, seq - num_tokens), seq):
        with torch.no_grad():
            cache = getattr(model(input_ids[:, :position], use_cache=True), CACHE_FIELD)
        model.zero_grad(set_to_none=True)
        out = model(input_ids[:, position : position + 1], **{CACHE_FIELD: cache},
                    attention_mask=torch.ones(1, position + 1, dtype=torch.long, device=input_ids.device), **extra)
        outputs = [out.logits, *(getattr(out, "router_logits", None) or ())]
        scalar = sum((o.float() * torch.randn(o.shape, generator=generator).to(o.device)).sum() for o in outputs)
        scalar.backward()
        counts.append(sum(int((p.grad != 0).sum()) for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return sum(counts) / len(counts)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="mom inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    parser.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: the model's)")
    parser.add_argument("--text", help="text whose routing is drawn as a heat map")
    parser.add_argument("--dataset", help="local file or Hub data set whose routing is tabulated")
    parser.add_argument("--split", default="validation", help="Hub split (default validation)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--max-samples", type=int, default=200, help="texts of --dataset to use")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text of --dataset")
    parser.add_argument("--out", required=True, help="heat map path (.png); tables and the usage map go beside it")
    args = parser.parse_args(argv)
    if args.text is None and args.dataset is None:
        raise WorkflowError("give --text, --dataset, or both.")
    check_positive(args, "max_samples", "max_length")
    check_picture_path(Path(args.out))
    config = load_model_config(args.model)
    tokenizer = load_tokenizer(args.model, args.tokenizer, needs_padding=args.dataset is not None)
    check_language_model(args.model, config, tokenizer)
    if args.text is not None:
        text_ids(tokenizer, args.text, config)
    max_length = min(args.max_length, model_context_length(config) or args.max_length)
    texts = None
    if args.dataset is not None:
        if is_local_data(args.dataset):
            data = load_local_split(args.dataset, [args.text_column])
        else:
            from datasets import load_dataset

            try:
                data = load_dataset(args.dataset, split=args.split)
            except Exception as error:  # datasets raises many types for a bad name or split
                raise WorkflowError(f"--dataset {args.dataset}: cannot load it ({error}).") from error
        check_columns(data, [args.text_column], f"--dataset {args.dataset}")
        texts = text_cells(data.select(range(min(args.max_samples, len(data))))[:], args.text_column)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    written = inspect_model(model, tokenizer, args.out, text=args.text, texts=texts, max_length=max_length)
    if "markdown" in written:
        print(written.pop("markdown"))
    print("wrote " + ", ".join(written.values()))
    return written
