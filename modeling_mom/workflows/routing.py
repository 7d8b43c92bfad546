"""`mom inspect`: how a model assembles itself, i.e. which module or expert each token used in each round or layer.

    mom inspect --model runs/demo/mom/pretrain/final --text "the cat sees the river ." --out routing.png
    mom inspect --model DIR --dataset held_out.jsonl --out routing.png       # usage table over a data set

For every router call (one per routed layer, or per round of a MoM chunk, in execution order) the token's
highest-scoring choice is recorded: a module or expert number, or SKIP (a MoM router with `enable_skip`). With `--text`:
a heat map (router call x token) at `--out` and a token table `<out>_tokens.csv`. With `--dataset`: the share of
tokens choosing each option, per router call, as `<out>_usage.csv` and printed as a table. Either way, the shares
(over the data set, else over the text) as a map, router call x choice, at `<out>_usage.png`. Works for any
architecture whose model records `router_logits` (`_can_record_outputs`).
"""

import argparse
import csv
import inspect
import math
import os
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

SKIP = -1  # the recorded choice of a token that picked SKIP (a MoM router's last choice, with `enable_skip`)


NO_ROUTERS = "the model has none (e.g. a MoM whose pools each hold one module, without SKIP)."


def has_skip(model) -> bool:
    """Whether every router's last choice is SKIP (MoM's `enable_skip`)."""
    return bool(getattr(model.config, "enable_skip", False))


def choice_names(sizes: list[int], skip: bool) -> list[str]:
    """The columns of the usage map and table: the modules / experts of the largest router, then SKIP if any."""
    return [str(c) for c in range(max(sizes))] + (["SKIP"] if skip else [])


def column(choice: int, sizes: list[int]) -> int:
    """A choice's column in `choice_names`: SKIP goes last whatever the router's size."""
    return max(sizes) if choice == SKIP else choice


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
        self.skip = has_skip(model)
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
        """Call labels, each call's top-1 choice per token `[num_tokens]` (`SKIP` for SKIP), and each call's number of
        modules or experts.

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
            width = logits.shape[-1]
            groups = logits.numel() // (width * num_tokens)
            if groups * width * num_tokens != logits.numel():
                raise WorkflowError(f"router {name} scored {logits.numel() // width} rows for {num_tokens} tokens.")
            chosen = logits.reshape(num_tokens, groups, width).argmax(-1)
            size = width - int(self.skip)
            chosen[chosen == size] = SKIP
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
    """(tokens, call labels, top-1 choices `[calls, tokens]`, modules or experts per call) for one text."""
    input_ids = text_ids(tokenizer, text, model.config).to(model.device)
    with torch.no_grad(), RouterRecorder(model) as recorder:
        model(input_ids)
    labels, choices, sizes = recorder.choices(input_ids.shape[1])
    tokens = [tokenizer.decode([t]) for t in input_ids[0].tolist()]
    return tokens, labels, torch.stack(choices) if choices else torch.empty(0, len(tokens)), sizes


def usage_over_texts(
    model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 8
) -> tuple[list[str], list[Counter], list[int]]:
    """(call labels, top-1 choice counts per call over the real tokens of all texts, modules or experts per call); each
    text cut
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
    """Router call x token, coloured by the token's choice; SKIP in grey, marked "S"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    most = max(sizes)
    palette = "tab10" if most <= 10 else "tab20" if most <= 20 else None
    cmap = ListedColormap(plt.get_cmap(palette).colors[:most]) if palette else plt.get_cmap("viridis")
    cmap = cmap.with_extremes(bad="lightgrey")  # one colour per choice; SKIP is masked
    values = np.ma.masked_equal(choices.numpy(), SKIP)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tokens) + 3), max(3, 0.32 * len(labels) + 1.5)))
    image = ax.imshow(values, cmap=cmap, vmin=-0.5, vmax=most - 0.5, aspect="auto", interpolation="nearest")
    if len(tokens) <= 48 and len(labels) <= 64:
        for row in range(choices.shape[0]):
            for col in range(choices.shape[1]):
                choice = int(choices[row, col])
                ax.text(col, row, "S" if choice == SKIP else choice, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("token")
    title = "highest-scoring module / expert per token and router call"
    ax.set_title(title + ("\n(grey, S: SKIP)" if (choices == SKIP).any() else ""))
    fig.colorbar(image, ax=ax, label="choice", ticks=range(most) if most <= 20 else None)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the canvas grows to fit the labels (tight_layout cut them)
    plt.close(fig)


def usage_shares(counts: list[Counter], sizes: list[int], skip: bool):
    """`[calls, choice_names]` shares of tokens per call and choice; NaN past a call's choices."""
    import numpy as np

    shares = np.full((len(counts), len(choice_names(sizes, skip))), np.nan)
    for row, (counter, size) in enumerate(zip(counts, sizes)):
        total = max(sum(counter.values()), 1)
        for choice in [*range(size), *([SKIP] if skip else [])]:
            shares[row, column(choice, sizes)] = counter.get(choice, 0) / total
    return shares


def plot_usage(labels: list[str], counts: list[Counter], sizes: list[int], skip: bool, path: Path) -> None:
    """One map, router call x choice, coloured by the share of tokens choosing it (blank past a call's choices),
    on a scale up to the largest share, so that a hundred experts' small shares stay apart. One picture scales to a
    MoEUT's hundred router calls, where a bar chart per call took ~10 s to lay out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = choice_names(sizes, skip)
    shares = usage_shares(counts, sizes, skip)
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(names) + 3), max(3, 0.16 * len(labels) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(shares), vmin=0, vmax=max(np.nanmax(shares), 1e-3), aspect="auto",
                      interpolation="nearest")  # fmt: skip
    ticks = range(len(names)) if len(names) <= 64 else [*range(0, len(names) - 1, 10), len(names) - 1]
    ax.set_xticks(ticks, [names[t] for t in ticks])  # the last column is SKIP, if the routers have it
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("choice (module / expert)")
    ax.set_title("share of tokens choosing each module / expert, per router call")
    fig.colorbar(image, ax=ax, label="share of tokens", fraction=0.08)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def usage_rows(labels: list[str], counts: list[Counter], sizes: list[int], skip: bool) -> list[list]:
    """Table rows: router call, then the share of tokens choosing each option (blank past its choices)."""
    shares = usage_shares(counts, sizes, skip)
    header = ["router call", *[name if name == "SKIP" else f"choice {name}" for name in choice_names(sizes, skip)]]
    cells = [["" if math.isnan(share) else f"{share:.3f}" for share in row] for row in shares.tolist()]
    return [header, *[[label, *row] for label, row in zip(labels, cells)]]


def write_csv(rows: list[list], path: Path) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def markdown(rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])


def check_picture_path(name: str) -> None:
    """--out names a .png file that can be written, as can the files beside it: none is a directory, and their
    directory is or can be made."""
    out = Path(name)
    directory = out.is_dir() or name.endswith(("/", os.sep))  # Path("x.png/") is Path("x.png")
    if out.suffix.lower() != ".png" or directory:
        found = "; it is a directory" if directory else ""
        raise WorkflowError(f"--out {name} must name a .png file (the heat map; tables are written beside it){found}.")
    beside = [str(path) for path in output_paths(out).values() if path.is_dir()]
    if beside:
        raise WorkflowError(f"--out {out}: {', '.join(beside)}, written beside it, is a directory; choose another "
                            "--out.")
    check_can_be_directory(out.parent, f"--out {out}")


def check_routes_tokens(config, model: str = "the model") -> None:
    """Refuse, before loading the weights, a MoM whose routers never run (`routing_mode="sequential"`)."""
    if getattr(config, "routing_mode", None) == "sequential":
        raise WorkflowError(f"{model} has routing_mode='sequential': round h of every chunk runs module h for "
                            "every token, so no router runs; inspect a model with 'learned' or 'all_modules' routing.")


def output_paths(out: Path) -> dict[str, Path]:
    """Every file `inspect` may write for `--out`: the heat map, and beside it the tables and the usage map."""
    return {"heatmap": out, "tokens": out.with_name(out.stem + "_tokens.csv"),
            "table": out.with_name(out.stem + "_usage.csv"), "usage": out.with_name(out.stem + "_usage.png")}


def inspect_model(model, tokenizer, out: str, text: str | None = None, texts: list[str] | None = None,
                  max_length: int | None = None) -> dict:
    """Route `text` and/or `texts` (each cut to `max_length` tokens, by default the model's positions), then write
    their pictures and tables, so that a failure writes nothing; returns the paths written, and for `texts` the usage
    table as Markdown."""
    check_picture_path(out)
    check_routes_tokens(model.config)
    paths = output_paths(Path(out))
    model.eval()
    routed = route_text(model, tokenizer, text) if text is not None else None
    if routed is not None and not routed[1]:
        raise WorkflowError(f"no router ran for this text: {NO_ROUTERS}")
    if texts is not None:
        max_length = max_length or model_context_length(model.config)
        labels, counts, sizes = usage_over_texts(model, tokenizer, texts, max_length)
        if not labels:
            raise WorkflowError(f"no router ran on these texts: {NO_ROUTERS}")
    else:
        _, labels, choices, sizes = routed
        counts = [Counter(row.tolist()) for row in choices]
    paths["heatmap"].parent.mkdir(parents=True, exist_ok=True)
    written = {}
    if routed is not None:
        tokens, text_labels, choices, text_sizes = routed
        plot_heatmap(tokens, text_labels, choices, text_sizes, paths["heatmap"])
        cells = [["SKIP" if c == SKIP else c for c in choices[:, i].tolist()] for i in range(len(tokens))]
        write_csv([["token", *text_labels], *[[t, *row] for t, row in zip(tokens, cells)]], paths["tokens"])
        written.update(heatmap=str(paths["heatmap"]), tokens=str(paths["tokens"]))
    if texts is not None:
        rows = usage_rows(labels, counts, sizes, has_skip(model))
        write_csv(rows, paths["table"])
        written.update(table=str(paths["table"]), markdown=markdown(rows))
    plot_usage(labels, counts, sizes, has_skip(model), paths["usage"])
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
    check_picture_path(args.out)
    config = load_model_config(args.model)
    check_routes_tokens(config, f"--model {args.model}")
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
