"""ModuleFormer's modularity promises as model methods: expert usage statistics, pruning and extension.

* `expert_usage(batches)`: how often each expert of each router is picked on a task's data.
* `prune_experts(usage, keep_top_n=None, threshold=None)`: drop the experts a task does not use, in place; the
  per-layer expert counts go into the config, so the pruned model saves and loads like any other.
* `add_experts(num_new, freeze_existing=True)`: append experts to every layer; with `freeze_existing`, only the new
  experts and their router rows can learn, so the existing parameters stay exactly as they were.

The model class provides `_expert_pools()`: `(layer index, "attention" | "mlp", experts)` per router, in call order,
and `_init_expert_projection(weight)`, which draws a new expert bank as the model's initialisation does.
"""

import numbers
from collections.abc import Iterable, Mapping

import torch

POOL_KINDS = ("attention", "mlp")


class ModuleFormerModularityMixin:
    @torch.no_grad()
    def expert_usage(self, batches: Iterable) -> dict[str, list[torch.Tensor]]:
        """Counts of each expert's selections on `batches`, per router, over non-padding tokens.

        Args:
            batches: an iterable of `input_ids` tensors, or of mappings with `input_ids` and optionally
                `attention_mask` (a tokenizer's output, or a DataLoader of a task's data with a padding collator).

        Returns:
            `{"attention": [...], "mlp": [...]}` with one int64 tensor per layer, as long as the layer has experts;
            a token that picks k experts counts once for each.
        """
        pools = self._expert_pools()
        usage = {kind: [None] * len(self.base_model.layers) for kind in POOL_KINDS}
        for layer_idx, kind, pool in pools:
            usage[kind][layer_idx] = torch.zeros(pool.num_experts, dtype=torch.long)
        was_training = self.training
        self.eval()
        try:
            for batch in batches:
                batch = batch if isinstance(batch, Mapping) else {"input_ids": batch}
                mask = batch.get("attention_mask")
                outputs = self.base_model(
                    input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, output_router_logits=True
                )
                for (layer_idx, kind, pool), logits in zip(pools, outputs.router_logits):
                    selected = logits.topk(pool.router.num_selected, dim=-1).indices  # same order as the gates
                    if mask is not None:
                        selected = selected[mask.reshape(-1).bool().to(selected.device)]
                    counts = torch.bincount(selected.reshape(-1), minlength=pool.num_experts)
                    usage[kind][layer_idx] += counts.cpu()
        finally:
            self.train(was_training)
        return usage

    @torch.no_grad()
    def prune_experts(
        self,
        usage: dict[str, list[torch.Tensor]],
        keep_top_n: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, list[torch.Tensor]]:
        """Keep, in every router, only the experts selected by `usage`; shrinks the weights in place.

        An expert is kept if it is among its router's `keep_top_n` most used (ties broken by index) and its share of
        the router's selections is above `threshold` (`threshold=0` keeps every expert used at least once); either
        criterion may be left out, and with both an expert must meet both.
        With un-normalised gates (the official model), the router rows of pruned experts are kept for the softmax's
        normaliser only, so the remaining gates are unchanged: a token whose top-k experts were all kept gets exactly
        the same output as before pruning, and any other token now uses its best kept experts.

        Returns:
            the kept (original) expert indices, in the same layout as `usage`.
        """
        if keep_top_n is None and threshold is None:
            raise ValueError("prune_experts needs keep_top_n and/or threshold.")
        if keep_top_n is not None:
            _check_positive_int("keep_top_n", keep_top_n)
        if threshold is not None and not 0 <= threshold < 1:
            raise ValueError(f"threshold={threshold} must be a share of selections in [0, 1).")
        pools = self._expert_pools()
        for kind in POOL_KINDS:
            layers = usage.get(kind) if isinstance(usage, dict) else None
            if not isinstance(layers, (list, tuple)) or len(layers) != len(self.base_model.layers):
                raise ValueError(
                    f"usage[{kind!r}] must hold one entry per layer ({len(self.base_model.layers)}); pass the result "
                    "of this model's expert_usage()."
                )
        plans = []
        for layer_idx, kind, pool in pools:
            counts = self._checked_counts(usage, kind, layer_idx, pool.num_experts)
            keep = torch.ones(pool.num_experts, dtype=torch.bool)
            if keep_top_n is not None:
                ranked = sorted(range(pool.num_experts), key=lambda e: (-int(counts[e]), e))
                keep &= torch.isin(torch.arange(pool.num_experts), torch.tensor(ranked[:keep_top_n]))
            if threshold is not None:
                keep &= counts.double() / max(int(counts.sum()), 1) > threshold
            kept = keep.nonzero().flatten()
            if len(kept) < pool.router.num_selected:
                raise ValueError(
                    f"pruning would leave {len(kept)} {kind} experts in layer {layer_idx}, fewer than the "
                    f"{pool.router.num_selected} each token uses; lower threshold or raise keep_top_n."
                )
            plans.append((pool, kept))
        keep_normaliser = not self.config.normalize_expert_gates
        for pool, kept in plans:
            pool.keep_experts(kept.to(pool.input_proj.device), keep_normaliser)
        self._record_expert_counts()
        kept = {kind: [None] * len(self.base_model.layers) for kind in POOL_KINDS}
        for (layer_idx, kind, _), (_, indices) in zip(pools, plans):
            kept[kind][layer_idx] = indices
        return kept

    @staticmethod
    def _checked_counts(usage, kind: str, layer_idx: int, num_experts: int) -> torch.Tensor:
        try:
            counts = torch.as_tensor(usage[kind][layer_idx]).cpu()
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"usage has no {kind!r} counts for layer {layer_idx}; pass the result of expert_usage()."
            ) from None
        if counts.shape != (num_experts,):
            raise ValueError(
                f"usage[{kind!r}][{layer_idx}] has shape {tuple(counts.shape)}; the layer has {num_experts} experts."
            )
        if counts.is_floating_point() or counts.is_complex() or bool((counts < 0).any()):
            raise ValueError(f"usage[{kind!r}][{layer_idx}] = {counts.tolist()}; selection counts are integers >= 0.")
        return counts

    @torch.no_grad()
    def add_experts(self, num_new: int, freeze_existing: bool = True):
        """Append `num_new` freshly initialised experts to every attention and feed-forward expert pool.

        The new router rows are initialised like the others, so tokens start using the new experts at once.
        With `freeze_existing`, every existing parameter stops receiving gradients: parameters other than the expert
        tensors and router output rows get `requires_grad=False`, and the expert tensors and router rows, which now
        also hold the new experts, have the gradient of their old rows zeroed by a hook. Exclude those tensors from
        weight decay, which would otherwise still shrink the frozen rows.
        """
        _check_positive_int("num_new", num_new)
        std = self.config.initializer_range
        if freeze_existing:
            for param in self.parameters():
                param.requires_grad_(False)
        for _, _, pool in self._expert_pools():
            old = pool.num_experts
            new = {}
            for name in ("input_proj", "output_proj", "input_bias", "output_bias"):
                param = getattr(pool, name)
                if param is not None:
                    fresh = param.new_zeros((num_new, *param.shape[1:]))
                    if name.endswith("proj"):
                        self._init_expert_projection(fresh)
                    new[name] = fresh
            weight = pool.router.out.weight
            pool.add_experts(new, weight.new_empty(num_new, weight.shape[1]).normal_(0.0, std))
            if freeze_existing:
                for name in new:
                    _train_rows_only(getattr(pool, name), old, old + num_new)
                _train_rows_only(pool.router.out.weight, old, old + num_new)
        self._record_expert_counts()

    def _record_expert_counts(self):
        """Write every layer's expert counts (live and pruned-router rows) into the config."""
        counts = {kind: [] for kind in POOL_KINDS}
        pruned = {kind: [] for kind in POOL_KINDS}
        for _, kind, pool in self._expert_pools():
            counts[kind].append(pool.num_experts)
            pruned[kind].append(pool.router.out.weight.shape[0] - pool.num_experts)
        self.config.attention_experts_per_layer = counts["attention"]
        self.config.mlp_experts_per_layer = counts["mlp"]
        self.config.pruned_attention_experts_per_layer = pruned["attention"] if any(pruned["attention"]) else None
        self.config.pruned_mlp_experts_per_layer = pruned["mlp"] if any(pruned["mlp"]) else None


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


def _train_rows_only(param: torch.nn.Parameter, start: int, end: int):
    """Let only rows `start:end` of `param` learn: the gradient of every other row is zeroed."""
    trainable = torch.zeros(param.shape[0], *([1] * (param.dim() - 1)), dtype=torch.bool)
    trainable[start:end] = True
    param.requires_grad_(True)
    param.register_hook(lambda grad: grad * trainable.to(grad.device))  # follows later `.to(device)` calls
